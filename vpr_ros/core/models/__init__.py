"""Registered VPR models, self-describing checkpoints and device selection.

Importing this package registers the built-in models (each model module registers itself on import).
"""

from vpr_ros.core.models import heads, scicevpr, structvpr  # noqa: F401  (registers the built-in models)
from vpr_ros.core.models.checkpoint import load_model, model_from_checkpoint, read_checkpoint, save_checkpoint
from vpr_ros.core.models.registry import (
    Preprocess,
    VprModel,
    create_model,
    get_spec,
    list_models,
    register_model,
    select_device,
)
from vpr_ros.core.models.resolve import DEFAULT_WEIGHTS, parse_size, resolve_model

__all__ = [
    "DEFAULT_WEIGHTS",
    "parse_size",
    "resolve_model",
    "Preprocess",
    "VprModel",
    "create_model",
    "get_spec",
    "list_models",
    "load_model",
    "model_from_checkpoint",
    "read_checkpoint",
    "register_model",
    "save_checkpoint",
    "select_device",
]
