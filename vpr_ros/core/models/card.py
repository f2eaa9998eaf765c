"""Model cards: what a packaged checkpoint was trained on and how it does in and out of its domain.

A card lives in the checkpoint itself (``meta["card"]``), so a weights file describes itself wherever it
is copied; ``vpr-ros models`` and docs/results.md read it from there. Its fields:

``key``
    short name (``general``, ``loqi``, ``structvpr``), the column name in the accuracy study;
``title``, ``train_data``
    one line each: what the model is, and the images (and links) it was trained on;
``train_domains``
    dataset families whose images it trained on (``nordland``, ``ie_tower``, ``kitti``, ...): a study set
    of such a family is *in domain*, any other set *out of domain*;
``train_sets``
    study sets whose very images it trained on (e.g. ``kitti05``): reported as training data, not a test;
``cross_domain``
    written by the accuracy study (:mod:`vpr_ros.studies.cross_domain`): R@1 / R@5 per study set and link,
    each set's domain, and the in / out-of-domain means.
``loop_closure``
    written by ``vpr-ros loop-eval --write-card``: the loop-closure operating point chosen for this model
    on RTAB-Map's sequence (``score_threshold``, ``top_k``, ``min_inliers``) and how it was measured. The
    launch file and the runner give the loop-closure node this ``score_threshold`` for the localizer's
    weights (:func:`loop_score_threshold`): descriptor similarities are on each model's own scale.

The input size is not repeated in the card: it is the checkpoint's preprocessing (``model.preprocess``).
:func:`write_card` rewrites only ``meta``; the weights and so :func:`weights_digest` stay the same.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vpr_ros.core.backends import model_hash
from vpr_ros.core.errors import ModelError
from vpr_ros.core.fileio import atomic_path, atomic_write_text
from vpr_ros.core.models.checkpoint import model_from_checkpoint, read_checkpoint
from vpr_ros.paths import weights_file

#: Study set -> dataset family (the unit of "in domain").
SET_FAMILY = {
    "nordland": "nordland",
    "ie_tower": "ie_tower",
    "kitti00": "kitti",
    "kitti05": "kitti",
    "rtabmap_loop": "rtabmap_loop",
    "tokyo_pair": "tokyo",
}
DOMAINS = ("in", "out", "train")


@dataclass
class ModelCard:
    """A checkpoint's card as read from the file (:func:`read_card`)."""

    path: Path
    key: str
    title: str
    method: str
    input_size: tuple[int, int] | None
    train_data: str
    train_domains: list[str] = field(default_factory=list)
    train_sets: list[str] = field(default_factory=list)
    cross_domain: dict[str, Any] = field(default_factory=dict)
    loop_closure: dict[str, Any] = field(default_factory=dict)

    def domain(self, set_key: str) -> str:
        """``train`` (its training images), ``in`` (its dataset family) or ``out`` for a study set."""
        if set_key in self.train_sets:
            return "train"
        return "in" if SET_FAMILY.get(set_key, set_key) in self.train_domains else "out"

    @property
    def size_text(self) -> str:
        return "native" if self.input_size is None else f"{self.input_size[0]}x{self.input_size[1]}"


def packaged_checkpoints(folder: str | os.PathLike | None = None) -> list[Path]:
    """The checkpoints shipped in ``vpr_ros/weights`` (or ``folder``), sorted by name."""
    folder = Path(folder) if folder is not None else Path(__file__).resolve().parents[2] / "weights"
    return sorted(folder.glob("*.pt"))


def card_from_checkpoint(ckpt: dict[str, Any], path: Path) -> ModelCard:
    meta = ckpt.get("meta") or {}
    card = meta.get("card") or {}
    size = (ckpt["model"].get("preprocess") or {}).get("input_size")
    key = card.get("key") or path.stem.replace("structvpr_mobilenetv2_", "")
    return ModelCard(
        path=path,
        key=str(key),
        title=str(card.get("title") or f"{ckpt['model']['name']} ({meta.get('method', '?')})"),
        method=str(meta.get("method", "?")),
        input_size=None if size is None else (int(size[0]), int(size[1])),
        train_data=str(card.get("train_data") or "not recorded in the checkpoint"),
        train_domains=[str(d) for d in card.get("train_domains", [])],
        train_sets=[str(s) for s in card.get("train_sets", [])],
        cross_domain=dict(card.get("cross_domain") or {}),
        loop_closure=dict(card.get("loop_closure") or {}),
    )


def read_card(path: str | os.PathLike) -> ModelCard:
    """The card of the checkpoint at ``path`` (fields it lacks are marked as not recorded)."""
    path = Path(path)
    return card_from_checkpoint(read_checkpoint(path), path)


def write_card(path: str | os.PathLike, updates: dict[str, Any]) -> bool:
    """Merge ``updates`` into the checkpoint's ``meta["card"]`` (atomically; weights untouched) and into
    its ``.json`` sidecar when there is one. False when nothing changed (the file is not rewritten)."""
    path = Path(path)
    ckpt = read_checkpoint(path)
    meta = dict(ckpt.get("meta") or {})
    card = {**(meta.get("card") or {}), **updates}
    if json.dumps(card, sort_keys=True, default=str) == json.dumps(meta.get("card"), sort_keys=True,
                                                                   default=str):
        return False
    meta["card"] = card
    ckpt["meta"] = meta
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)
    sidecar = path.with_suffix(".json")
    if sidecar.is_file():
        try:
            info = json.loads(sidecar.read_text())
        except ValueError:
            raise ModelError(f"{sidecar}: not valid JSON; fix or remove it") from None
        info["card"] = card
        atomic_write_text(sidecar, json.dumps(info, indent=2, default=str) + "\n")
    return True


def loop_score_threshold(weights: str | os.PathLike | None) -> float | None:
    """The loop-closure ``score_threshold`` on the card of the checkpoint ``weights`` names (as the
    localizer's ``weights`` parameter: ``default``, a packaged key, a path); None when there is none
    (ImageNet weights, a model name, a checkpoint without that card entry, a file that cannot be read)."""
    path = weights_file(weights)
    if path is None:
        return None
    try:
        value = read_card(path).loop_closure.get("score_threshold")
    except ModelError:
        return None  # the localizer reports an unreadable checkpoint
    return None if value is None else float(value)


def weights_digest(path: str | os.PathLike) -> str:
    """sha256 of the model a checkpoint holds (description + every tensor), unchanged by its ``meta``."""

    path = Path(path)
    return model_hash(model_from_checkpoint(read_checkpoint(path), source=str(path)))


#: Links of the cards' cross-domain summary, in order, with their column titles.
CARD_LINKS = (("none", "clean"), ("jpeg_q10", "JPEG q10"), ("res_0.25", "1/4 res"),
              ("h264_qp40", "H.264 QP40"), ("h265_qp40", "H.265 QP40"))


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def format_card(card: ModelCard, *, default: bool = False) -> list[str]:
    """Text lines of a card for ``vpr-ros models``."""
    tag = " (default)" if default else ""
    lines = [f"{card.key}{tag}: {card.path.name}, input {card.size_text}, method {card.method}",
             f"    {card.title}",
             f"    trained on: {card.train_data}"]
    lc = card.loop_closure
    if lc.get("score_threshold") is not None:
        lines.append(f"    loop closure: score_threshold {lc['score_threshold']:g}, top_k "
                     f"{lc.get('top_k', '?')}, min_inliers {lc.get('min_inliers', '?')} "
                     f"({lc.get('measured', 'how: not recorded')})")
    cd = card.cross_domain
    summary = cd.get("summary") or {}
    if not summary:
        lines.append("    cross-domain R@1: not measured yet (make study)")
        return lines
    heads = [t for _, t in CARD_LINKS]
    lines.append("    R@1 %        " + " | ".join(f"{h:>10s}" for h in heads) + "   sets")
    for dom, text in (("in", "in domain"), ("out", "out of dom."), ("train", "train data")):
        row = summary.get(dom)
        if not row or not row.get("sets"):
            continue
        vals = " | ".join(f"{_pct(row['R@1'].get(lb)):>10s}" for lb, _ in CARD_LINKS)
        lines.append(f"    {text:12s} {vals}   {', '.join(row['sets'])}")
    if cd.get("measured"):
        lines.append(f"    (mean over sets; {cd['measured']})")
    return lines
