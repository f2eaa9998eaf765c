"""Evaluation figures written to files (PNG, PDF, SVG by suffix). Never opens a window.

Figures are built on :class:`matplotlib.figure.Figure` directly and rendered by the Agg canvas,
so pyplot's global state and the process-wide backend are left untouched.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from vpr_ros.eval.metrics import EvalResult, PRCurve

CORRECT_COLOR = "#1a9850"
WRONG_COLOR = "#d73027"
QUERY_COLOR = "#4575b4"


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=fig.dpi)
    return path


def plot_recall_curves(
    results: Sequence[EvalResult], path: str | os.PathLike, *, title: str | None = None
) -> Path:
    """Recall@N (percent) versus N, one line per result; returns the written path."""
    if not results:
        raise ValueError("no results to plot")
    return _recall_lines({r.label: r.recalls for r in results}, path, log_x=True,
                         xlabel="N (top-N retrieved)", ylabel="recall@N (%)", title=title or "Recall@N")


def _recall_lines(curves: Mapping[str, Mapping[int, float | None]], path: str | os.PathLike, *, log_x: bool,
                  xlabel: str, ylabel: str, title: str) -> Path:
    """One line of recall (percent) against an integer x per curve; non-finite points are left out."""
    fig = Figure(figsize=(6.0, 4.2), dpi=110)
    ax = fig.add_subplot()
    for label, c in curves.items():
        xs = sorted(int(n) for n, v in c.items() if v is not None and math.isfinite(v))
        ax.plot(xs, [100 * c[n] for n in xs], marker="o", label=label)
    if log_x:
        ax.set_xscale("log")
    ticks = sorted({int(n) for c in curves.values() for n in c})
    if ticks:
        ax.set_xticks(ticks, [str(n) for n in ticks])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 100)
    ax.grid(True, alpha=0.3)
    ax.set_title(title)
    ax.legend(fontsize="small", loc="lower right")
    fig.tight_layout()
    return _save(fig, path)


def plot_pr_curves(
    curves: Mapping[str, PRCurve], path: str | os.PathLike, *, title: str | None = None
) -> Path:
    """Precision versus recall, one curve per entry (legend gives AP and recall at 100% precision)."""
    if not curves:
        raise ValueError("no curves to plot")
    fig = Figure(figsize=(5.5, 4.5), dpi=110)
    ax = fig.add_subplot()
    for name, c in curves.items():
        ax.plot(c.recall, c.precision, marker="." if len(c.recall) < 50 else None,
                label=f"{name} (AP {c.average_precision:.2f}, R@100P {c.recall_at_100_precision:.2f})")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.grid(True, alpha=0.3)
    ax.set_title(title or "Precision-recall")
    ax.legend(fontsize="small", loc="lower left")
    fig.tight_layout()
    return _save(fig, path)


def _framed(ax, image: np.ndarray, color: str, title: str | None) -> None:
    ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=255)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor(color)
        spine.set_linewidth(4)
    if title:
        ax.set_title(title, fontsize=7)


def plot_match_montage(
    query_images: Sequence[np.ndarray],
    db_images_per_query: Sequence[Sequence[np.ndarray]],
    correct_flags: Sequence[Sequence[bool]],
    path: str | os.PathLike,
    *,
    titles: Sequence[str] | None = None,
    max_rows: int = 8,
) -> Path:
    """One row per query (at most ``max_rows``): the query (blue frame), then its top-k retrievals
    framed green when correct and red when wrong. ``titles`` label the query of each row."""
    n = len(query_images)
    if n == 0:
        raise ValueError("no queries to show")
    if len(db_images_per_query) != n or len(correct_flags) != n:
        raise ValueError(f"{n} queries but {len(db_images_per_query)} retrieval lists and "
                         f"{len(correct_flags)} flag lists")
    if titles is not None and len(titles) != n:
        raise ValueError(f"{n} queries but {len(titles)} titles")
    for i, (imgs, flags) in enumerate(zip(db_images_per_query, correct_flags, strict=True)):
        if len(imgs) != len(flags):
            raise ValueError(f"query {i}: {len(imgs)} retrievals but {len(flags)} correctness flags")
    rows = min(n, max_rows)
    k = max((len(db_images_per_query[i]) for i in range(rows)), default=0)
    cols = 1 + k
    fig = Figure(figsize=(1.9 * cols, 1.5 * rows + 0.3), dpi=110)
    axes = fig.subplots(rows, cols, squeeze=False)
    for r in range(rows):
        _framed(axes[r][0], query_images[r], QUERY_COLOR, titles[r] if titles is not None else "query")
        for c in range(1, cols):
            ax = axes[r][c]
            if c - 1 < len(db_images_per_query[r]):
                ok = bool(correct_flags[r][c - 1])
                _framed(ax, db_images_per_query[r][c - 1], CORRECT_COLOR if ok else WRONG_COLOR,
                        f"#{c} {'correct' if ok else 'wrong'}")
            else:
                ax.axis("off")
    fig.tight_layout()
    return _save(fig, path)


def plot_recall_vs_bytes(
    results: Sequence[EvalResult], path: str | os.PathLike, *, n: int = 1, title: str | None = None
) -> Path:
    """Recall@``n`` versus bytes per frame, one line per dataset/model through its degradations
    (the bandwidth-accuracy curve); each point is labelled with its degradation. Results without
    ``bytes_per_frame`` or recall@``n`` are left out; ValueError if none remains."""
    groups: dict[str, list[EvalResult]] = defaultdict(list)
    for r in results:
        v = r.recalls.get(n)
        if r.bytes_per_frame is None or v is None or not math.isfinite(v) or not r.bytes_per_frame > 0:
            continue
        groups[" / ".join(p for p in (r.name, r.model) if p)].append(r)
    if not groups:
        raise ValueError(f"no result has both bytes_per_frame and recall@{n}")
    fig = Figure(figsize=(6.5, 4.5), dpi=110)
    ax = fig.add_subplot()
    all_bytes = []
    for label, members in groups.items():
        members.sort(key=lambda r: r.bytes_per_frame)
        x = [r.bytes_per_frame for r in members]
        y = [100 * r.recalls[n] for r in members]
        all_bytes += x
        ax.plot(x, y, marker="o", label=label)
        for r, xi, yi in zip(members, x, y, strict=True):
            ax.annotate(r.degradation, (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if max(all_bytes) / min(all_bytes) > 20:
        ax.set_xscale("log")
    ax.set_xlabel("bytes per frame")
    ax.set_ylabel(f"recall@{n} (%)")
    ax.set_ylim(0, 100)
    ax.grid(True, alpha=0.3)
    ax.set_title(title or f"Recall@{n} vs bandwidth")
    ax.legend(fontsize="small", loc="lower right")
    fig.tight_layout()
    return _save(fig, path)


def plot_recall_vs_sequence_length(
    curves: Mapping[str, Mapping[int, float]], path: str | os.PathLike, *, title: str | None = None
) -> Path:
    """Recall@1 (percent) against the sequence length L, one line per link (``{label: {L: R@1}}``)."""
    if not curves or not any(curves.values()):
        raise ValueError("no sequence results to plot")
    return _recall_lines(curves, path, log_x=False, xlabel="sequence length L (frames; 1 = single frame)",
                         ylabel="recall@1 (%)", title=title or "Recall@1 against sequence length")
