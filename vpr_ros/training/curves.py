"""Loss curves of training runs: the loss terms of each run's ``train.csv`` against step, a panel per run."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

from vpr_ros.core.errors import DatasetError

#: train.csv columns that are not loss terms.
BOOKKEEPING = ("step", "epoch", "lr", "sec_per_step", "train_seconds")


def loss_columns(header: Sequence[str]) -> list[str]:
    """The loss-term columns of a ``train.csv`` header (``loss`` first), without pair statistics."""
    return [c for c in header if c not in BOOKKEEPING and not c.endswith("_pairs")]


def plot_losses(run_dirs: Sequence[str | os.PathLike], out: str | os.PathLike) -> Path:
    """Loss terms against step (one panel per run, from its train.csv) written to ``out`` (PNG/PDF/SVG);
    a term identical to the total loss is drawn once, as ``loss``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # optional dependency, loaded to plot
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2 * len(run_dirs), 3.8), dpi=110)
    for i, run in enumerate(run_dirs):
        path = Path(run) / "train.csv"
        if not path.is_file():
            raise DatasetError(f"{path}: not found (a run directory holds train.csv)")
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            header = list(reader.fieldnames or [])
        if not rows:
            raise DatasetError(f"{path}: no rows")
        ax = fig.add_subplot(1, len(run_dirs), i + 1)
        steps = [int(float(r["step"])) for r in rows]
        total = [float(r["loss"]) for r in rows]
        for key in loss_columns(header):
            vals = [float(r[key]) for r in rows if r.get(key) not in (None, "")]
            if len(vals) == len(steps) and (key == "loss" or vals != total):
                ax.plot(steps, vals, label=key, marker="." if len(steps) < 40 else None)
        ax.set_title(Path(run).name)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(out)
    return out
