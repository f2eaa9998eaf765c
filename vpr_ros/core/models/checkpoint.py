"""Self-describing checkpoints.

A checkpoint is a ``torch.save`` dict of plain types and tensors only, so it loads with
``weights_only=True`` (no pickle code execution)::

    {"format": "vpr_ros.checkpoint", "version": 1, "kind": "deployed" | "training",
     "model": {"name", "config", "descriptor_dim", "preprocess"},
     "state_dict": {...}, "meta": {...}}

Training checkpoints add optimizer/scheduler/RNG state under other keys (see
``vpr_ros.training``); :func:`load_model` reads the model from either kind.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

from vpr_ros import __version__
from vpr_ros.core.errors import ModelError
from vpr_ros.core.fileio import atomic_path
from vpr_ros.core.models.registry import Preprocess, VprModel, create_model

FORMAT = "vpr_ros.checkpoint"
VERSION = 1


def save_checkpoint(
    model: VprModel,
    path: str | os.PathLike,
    *,
    kind: str = "deployed",
    meta: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` atomically as a self-describing checkpoint and return the path."""
    payload: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "kind": kind,
        "model": model.describe(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "meta": {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "vpr_ros_version": __version__,
                 **(meta or {})},
    }
    if extra:
        clash = set(extra) & set(payload)
        if clash:
            raise ModelError(f"checkpoint extra keys clash with reserved keys: {sorted(clash)}")
        payload.update(extra)
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load and validate a checkpoint dict (``weights_only=True``); clear errors on bad files."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: checkpoint file not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, not a torch file, disallowed pickle globals
        raise ModelError(f"{path}: not a readable vpr_ros checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ModelError(f"{path}: not a vpr_ros checkpoint (missing format tag {FORMAT!r})")
    if int(ckpt.get("version", -1)) > VERSION:
        raise ModelError(
            f"{path}: checkpoint version {ckpt.get('version')} is newer than supported ({VERSION})"
        )
    model = ckpt.get("model")
    if not isinstance(model, dict) or not {"name", "config", "descriptor_dim"} <= set(model):
        raise ModelError(f"{path}: checkpoint lacks its model description")
    if not isinstance(ckpt.get("state_dict"), dict):
        raise ModelError(f"{path}: checkpoint lacks a state_dict")
    if model.get("preprocess"):  # sizes checked before anything is allocated for them
        try:
            Preprocess.from_dict(model["preprocess"])
        except (ModelError, TypeError, AttributeError) as exc:
            raise ModelError(f"{path}: {exc}") from None
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any], *, source: str = "checkpoint") -> VprModel:
    """Rebuild the described model and load its weights (strict)."""
    desc = ckpt["model"]
    preprocess = Preprocess.from_dict(desc["preprocess"]) if desc.get("preprocess") else None
    model = create_model(desc["name"], pretrained=False, preprocess=preprocess, **desc["config"])
    mismatch = state_dict_mismatch(model.state_dict(), ckpt["state_dict"], desc["name"])
    if mismatch:
        raise ModelError(f"{source}: {mismatch}")
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as exc:
        text = str(exc).splitlines()[0][:300]
        raise ModelError(f"{source}: weights do not fit model {desc['name']!r}: {text}") from None
    if model.descriptor_dim != int(desc["descriptor_dim"]):
        raise ModelError(
            f"{source}: descriptor_dim {desc['descriptor_dim']} in the checkpoint but the model gives "
            f"{model.descriptor_dim}"
        )
    return model


#: Key prefixes that identify the architecture a state_dict comes from, for error messages.
_FAMILIES = (
    (("layer1.", "conv1.", "bn1."), "a ResNet"),
    (("patch_embed.", "blocks."), "a vision transformer (ViT / DINOv2)"),
    (("features.",), "a torchvision MobileNet / VGG-style network"),
    (("backbone.features.",), "a MobileNetV2-backbone vpr_ros model"),
)


def _family(keys: set[str]) -> str | None:
    best = max(_FAMILIES, key=lambda f: sum(any(k.startswith(p) for k in keys) for p in f[0]))
    return best[1] if any(k.startswith(p) for k in keys for p in best[0]) else None


def state_dict_mismatch(expected: dict[str, Any], given: dict[str, Any], name: str) -> str | None:
    """A short summary of why ``given`` does not fit model ``name`` whose ``state_dict()`` is
    ``expected`` (the architecture ``given`` looks like, counts and one example of missing, unexpected
    and reshaped weights); None if it fits."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [(k, tuple(given[k].shape), tuple(v.shape)) for k, v in expected.items()
              if k in given and hasattr(given[k], "shape") and tuple(given[k].shape) != tuple(v.shape)]
    if not (missing or unexpected or shapes):
        return None
    if unexpected and len(missing) > len(expected) // 2:  # mostly other layers: another architecture
        family = _family(set(given))
        head = f"checkpoint is for {family or 'another architecture'}, expected {name!r}"
    else:
        head = f"weights do not fit model {name!r}"
    parts = []
    if missing:
        parts.append(f"{len(missing)} of {len(expected)} weights missing (e.g. {missing[0]!r})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]!r})")
    if shapes:
        k, got, want = shapes[0]
        parts.append(f"{len(shapes)} of other shape (e.g. {k!r}: {list(got)}, expected {list(want)})")
    return f"{head} ({'; '.join(parts)})"


def load_model(
    path: str | os.PathLike, *, device: str | torch.device = "cpu", expected_name: str | None = None
) -> VprModel:
    """Load a checkpoint into a ready-to-run model in eval mode on ``device``."""
    ckpt = read_checkpoint(path)
    name = ckpt["model"]["name"]
    if expected_name and name != expected_name:
        raise ModelError(f"{path}: checkpoint holds model {name!r}, expected {expected_name!r}")
    model = model_from_checkpoint(ckpt, source=str(path))
    return model.to(device).eval()
