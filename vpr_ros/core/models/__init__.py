"""Registered VPR models, self-describing checkpoints and device selection."""

from .checkpoint import load_model, model_from_checkpoint, read_checkpoint, save_checkpoint
from .registry import (
    Preprocess,
    VprModel,
    create_model,
    get_spec,
    list_models,
    register_model,
    select_device,
)

__all__ = [
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
