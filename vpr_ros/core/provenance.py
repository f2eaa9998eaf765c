"""Which weights made a map's descriptors: recorded when a map is built, checked when it is queried.

Descriptors of one map are comparable only with descriptors of the same weights at the same input
size. :func:`descriptor_source` describes an extractor as ``{"model", "weights_id", "input_size",
"dim"}``; :class:`~vpr_ros.core.mapdb.PlaceMap` stores it in its manifest and
:func:`source_mismatch` says why a map cannot be queried by another extractor.

``weights_id`` is ``params-sha256:<hex>``: a sha256 over the model's state dict (names, shapes and
values, floating-point tensors rounded to fp16 first). It names the weights however they were
loaded (packaged student, a checkpoint file, ImageNet initialisation) and is the same for an fp32
model and its fp16 copy (``precision: fp16``), whose descriptors agree to fp16 accuracy.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch

__all__ = ["SOURCE_KEYS", "descriptor_source", "describe_source", "source_mismatch", "weights_id"]

#: Keys of a descriptor source record.
SOURCE_KEYS = ("model", "weights_id", "input_size", "dim")


def weights_id(model: torch.nn.Module) -> str:
    """``params-sha256:<hex>`` of ``model``'s state dict (floating-point tensors rounded to fp16)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu()
        if t.is_floating_point():  # numpy converts (torch's pool spin-waits on busy cores: 10x slower)
            arr = (t.float() if t.dtype == torch.bfloat16 else t).numpy().astype(np.float16)
        else:
            arr = t.numpy()
        h.update(f"{name}:{tuple(arr.shape)}:{arr.dtype}\n".encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return f"params-sha256:{h.hexdigest()}"


def descriptor_source(extractor: Any) -> dict[str, Any]:
    """The source record of a :class:`~vpr_ros.core.extract.DescriptorExtractor`'s descriptors."""
    size = extractor.preprocess.input_size
    return {
        "model": str(getattr(extractor.model, "name", "") or type(extractor.model).__name__),
        "weights_id": weights_id(extractor.model),
        "input_size": [int(size[0]), int(size[1])] if size else "native",
        "dim": int(extractor.dim),
    }


def describe_source(source: dict[str, Any]) -> str:
    """``structvpr_mobilenetv2, weights params-sha256:1a2b3c4d5e6f, input 32x64`` (one line)."""
    size = source.get("input_size")
    size_text = f"{size[0]}x{size[1]}" if isinstance(size, list) and len(size) == 2 else str(size)
    wid = str(source.get("weights_id", "?"))
    prefix, _, digest = wid.partition(":")
    short = f"{prefix}:{digest[:12]}" if digest else wid
    return f"{source.get('model', '?')}, weights {short}, input {size_text}"


def source_mismatch(recorded: dict[str, Any], ours: dict[str, Any]) -> str | None:
    """Why descriptors of ``ours`` cannot be compared with a map whose descriptors came from
    ``recorded``; None when they can."""
    if recorded.get("weights_id") != ours.get("weights_id") or recorded.get("model") != ours.get("model"):
        return (f"its descriptors were made by other weights ({describe_source(recorded)}) than this "
                f"extractor's ({describe_source(ours)}); rebuild the map with these weights "
                "(vpr-ros build-map) or run the weights that built it")
    if recorded.get("input_size") != ours.get("input_size"):
        return (f"its descriptors were made at another input size ({describe_source(recorded)}) than this "
                f"extractor's ({describe_source(ours)}); use the map's input size or rebuild the map")
    if recorded.get("dim") != ours.get("dim"):
        return f"its descriptors have {recorded.get('dim')} dimensions, this extractor's {ours.get('dim')}"
    return None
