"""Training checkpoint -> deployed weights: the student alone, as a ``kind="deployed"`` self-describing
checkpoint that :func:`vpr_ros.core.models.load_model` loads unchanged."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from vpr_ros.core.errors import ModelError
from vpr_ros.core.fileio import atomic_write_text
from vpr_ros.core.models import model_from_checkpoint, read_checkpoint, save_checkpoint


def export_deployed(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    expected_name: str | None = None,
    meta: dict[str, Any] | None = None,
    sidecar: bool = False,
) -> Path:
    """Write the student of a training checkpoint to ``out`` (atomically) and return the path.

    The deployed file keeps the model description (name, config, descriptor size, preprocessing) and
    records the training provenance under ``meta`` (step, degradation, teacher, final validation
    metrics). ``sidecar`` also writes ``out`` with suffix ``.json`` holding that provenance.
    """
    ckpt = read_checkpoint(checkpoint)
    if ckpt.get("kind") != "training":
        raise ModelError(f"{checkpoint}: expected a training checkpoint, got kind {ckpt.get('kind')!r}")
    name = ckpt["model"]["name"]
    if expected_name and name != expected_name:
        raise ModelError(f"{checkpoint}: holds model {name!r}, expected {expected_name!r}")
    model = model_from_checkpoint(ckpt, source=str(checkpoint))
    cfg = ckpt.get("config", {})
    provenance = {
        "method": ckpt.get("meta", {}).get("method") or "loqi",
        "source_checkpoint": Path(checkpoint).name,
        "step": int(ckpt.get("step", 0)),
        "total_steps": int(ckpt.get("total_steps", 0)),
        "train_seconds": float(ckpt.get("train_seconds", 0.0)),
        "degradation": cfg.get("degradation", {}),
        "loss": cfg.get("loss", {}),
        "teacher": cfg.get("model", {}).get("teacher"),
        "validation": dict(ckpt.get("metrics", {})),
        **(meta or {}),
    }
    path = save_checkpoint(model, out, kind="deployed", meta=provenance)
    if sidecar:
        info = {"model": model.describe(), **provenance}
        atomic_write_text(Path(out).with_suffix(".json"), json.dumps(info, indent=2, default=str) + "\n")
    return path
