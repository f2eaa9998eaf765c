"""Training pipelines (never imports rclpy): LoQI-VPR distillation for low-quality query images.

One module per concern: :mod:`.config` (recipes), :mod:`.data` (place sets, split, tuples,
degradation), :mod:`.losses` (ICKD, MSE, triplet), :mod:`.loqi` (the method), :mod:`.engine`
(the loop: logs, validation, checkpoints, resume, DDP), :mod:`.export` (deployed weights),
:mod:`.study` (the ablation table), :mod:`.cli` (subcommands).
"""

from vpr_ros.training.config import TrainConfig, config_from_dict, load_config
from vpr_ros.training.engine import TrainResult, train
from vpr_ros.training.export import export_deployed

__all__ = ["TrainConfig", "TrainResult", "config_from_dict", "export_deployed", "load_config", "train"]
