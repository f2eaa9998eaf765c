"""Model registry: every model's facts (preprocessing, builder, defaults) live here, once.

A model is registered with :func:`register_model`; everything else (the localizer node,
map builder, evaluation, training, checkpoints) creates models by name through
:func:`create_model` and reads preprocessing from the model itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn

from vpr_ros.core.errors import ModelError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Sides of a model input (pixels) accepted from checkpoints and --input-size: 16 .. 4096. Models here
#: run at 224-640; a batch of 32 frames at 4096x4096 already needs 6.4 GB as float32 input.
MIN_INPUT_SIDE, MAX_INPUT_SIDE = 16, 4096


def check_input_size(h: int, w: int, what: str = "input size") -> None:
    """Raise :class:`ModelError` unless both sides lie in MIN_INPUT_SIDE..MAX_INPUT_SIDE."""
    if not (MIN_INPUT_SIDE <= h <= MAX_INPUT_SIDE and MIN_INPUT_SIDE <= w <= MAX_INPUT_SIDE):
        raise ModelError(f"{what} {h}x{w} (HxW) is out of range: each side must be in "
                         f"{MIN_INPUT_SIDE}..{MAX_INPUT_SIDE}")


@dataclass(frozen=True)
class Preprocess:
    """How raw RGB uint8 images become the model's input tensor."""

    input_size: tuple[int, int] | None = (240, 320)  # (H, W); None keeps each image's own size
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def to_dict(self) -> dict[str, Any]:
        return {
            "input_size": list(self.input_size) if self.input_size else None,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ModelError(f"unknown preprocessing keys: {sorted(unknown)}")
        size = d.get("input_size")
        if size is not None:
            try:
                h, w = (int(v) for v in size)
            except (TypeError, ValueError):
                raise ModelError(f"preprocessing input_size must be [H, W], got {size!r}") from None
            check_input_size(h, w, "preprocessing input_size")
            size = (h, w)
        return cls(
            input_size=size,
            mean=tuple(float(v) for v in d.get("mean", IMAGENET_MEAN)),
            std=tuple(float(v) for v in d.get("std", IMAGENET_STD)),
        )


#: The base class's placeholder; a builder that sets its own preprocessing (e.g. from an image-size
#: config) replaces it, and :func:`create_model` then keeps the builder's choice.
_BASE_PREPROCESS = Preprocess()


class VprModel(nn.Module):
    """Base class of registered models: image batch -> L2-normalised global descriptors.

    Subclasses set ``descriptor_dim`` and implement :meth:`forward`; models used for
    feature distillation also implement :meth:`forward_features`.
    """

    name: str = ""
    descriptor_dim: int = 0

    def __init__(self) -> None:
        super().__init__()
        self.config: dict[str, Any] = {}
        self.preprocess = _BASE_PREPROCESS

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:  # pragma: no cover - optional
        raise NotImplementedError(f"{type(self).__name__} exposes no intermediate features")

    def describe(self) -> dict[str, Any]:
        """The self-description stored in checkpoints."""
        return {
            "name": self.name,
            "config": dict(self.config),
            "descriptor_dim": int(self.descriptor_dim),
            "preprocess": self.preprocess.to_dict(),
        }


Builder = Callable[..., VprModel]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    builder: Builder
    description: str
    preprocess: Preprocess
    defaults: dict[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(
    name: str, *, description: str, preprocess: Preprocess | None = None, **defaults: Any
) -> Callable[[Builder], Builder]:
    """Decorator registering ``builder(pretrained: bool, **config) -> VprModel`` under ``name``."""

    def wrap(builder: Builder) -> Builder:
        if name in _REGISTRY:
            raise ModelError(f"model {name!r} is registered twice")
        _REGISTRY[name] = ModelSpec(name, builder, description, preprocess or Preprocess(), dict(defaults))
        return builder

    return wrap


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ModelError(f"unknown model {name!r}; known models: {', '.join(sorted(_REGISTRY))}") from None


def create_model(
    name: str,
    *,
    pretrained: bool = False,
    preprocess: Preprocess | dict[str, Any] | None = None,
    **config: Any,
) -> VprModel:
    """Build a registered model. ``pretrained`` loads the backbone's published weights
    (ImageNet for MobileNetV2) through its library's normal weights API."""
    spec = get_spec(name)
    unknown = set(config) - set(spec.defaults)
    if unknown:
        raise ModelError(
            f"model {name!r} has no config keys {sorted(unknown)}; valid keys: {sorted(spec.defaults)}"
        )
    merged = {**spec.defaults, **config}
    model = spec.builder(pretrained=pretrained, **merged)
    model.name = name
    model.config = merged
    if isinstance(preprocess, dict):
        preprocess = Preprocess.from_dict(preprocess)
    if preprocess is not None:
        model.preprocess = preprocess
    elif model.preprocess is _BASE_PREPROCESS:  # the builder did not choose: the spec's default
        model.preprocess = spec.preprocess
    return model


def select_device(preference: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU; ``cuda``/``cuda:N``/``cpu`` are explicit."""
    pref = (preference or "auto").lower()
    if pref == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if pref.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ModelError(f"device {preference!r} requested but CUDA is not available on this machine")
        return torch.device(pref)
    if pref == "cpu":
        return torch.device("cpu")
    raise ModelError(f"unknown device {preference!r}; use auto, cpu, cuda or cuda:N")
