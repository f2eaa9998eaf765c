"""Training (never imports rclpy): the method-agnostic engine (:mod:`.engine`), the recipe sections every
method shares (:mod:`.config`), place data and tuples (:mod:`.data`), validation (:mod:`.evaluate`),
deployed weights (:mod:`.export`), and the methods (:mod:`.methods`: LoQI, the general student, SciceVPR,
StructVPR). ``train`` runs a recipe of any method; ``config_from_dict`` / ``load_config`` read LoQI's.
"""

from vpr_ros.training.engine import TrainResult
from vpr_ros.training.export import export_deployed
from vpr_ros.training.methods import METHODS, load_recipe, train
from vpr_ros.training.methods.loqi import TrainConfig, config_from_dict, load_config

__all__ = [
    "METHODS",
    "TrainConfig",
    "TrainResult",
    "config_from_dict",
    "export_deployed",
    "load_config",
    "load_recipe",
    "train",
]
