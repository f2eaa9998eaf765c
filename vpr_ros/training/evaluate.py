"""Validation recall@N of a model on a held-out :class:`~vpr_ros.data.places.PlaceDataset`:
high-quality database images, degraded query images, exhaustive cosine retrieval."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from vpr_ros.core.extract import DescriptorExtractor
from vpr_ros.core.models.registry import VprModel
from vpr_ros.data.places import PlaceDataset
from vpr_ros.eval.metrics import RecallResult, recall_at_n


def describe(
    model: VprModel, images: Sequence[np.ndarray], *, device: torch.device | str = "cpu", batch_size: int = 64
) -> np.ndarray:
    """(N, D) float32 descriptors; leaves the model in eval mode on ``device``."""
    if not images:
        return np.empty((0, model.descriptor_dim), np.float32)
    return DescriptorExtractor(model, device=device, batch_size=batch_size)(list(images))


def retrieve(
    q_desc: np.ndarray, db_desc: np.ndarray, k: int, excluded: Sequence[np.ndarray] | None = None
) -> np.ndarray:
    """(Q, k) database indices by descending cosine similarity; ``excluded`` rows are never returned."""
    k = min(k, db_desc.shape[0])
    preds = np.empty((len(q_desc), k), dtype=np.int64)
    for s in range(0, len(q_desc), 1024):
        sims = q_desc[s : s + 1024] @ db_desc.T
        if excluded is not None:
            for r, ex in enumerate(excluded[s : s + 1024]):
                if len(ex):
                    sims[r, ex] = -np.inf
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sims, top, axis=1), axis=1, kind="stable")
        preds[s : s + 1024] = np.take_along_axis(top, order, axis=1)
    return preds


def recall_on_places(
    q_desc: np.ndarray, db_desc: np.ndarray, places: PlaceDataset, ns: Sequence[int] = (1, 5, 10)
) -> RecallResult:
    """Recall@N of query descriptors against database descriptors with the places' positives."""
    preds = retrieve(q_desc, db_desc, max(ns), places.excluded())
    return recall_at_n(preds, places.positives(), ns)


def evaluate_model(
    model: VprModel,
    places: PlaceDataset,
    queries: Sequence[np.ndarray],
    *,
    db_model: VprModel | None = None,
    db_desc: np.ndarray | None = None,
    device: torch.device | str = "cpu",
    batch_size: int = 64,
    ns: Sequence[int] = (1, 5, 10),
) -> tuple[RecallResult, np.ndarray]:
    """Recall of ``model`` on ``queries`` (already degraded) against the database described by
    ``db_model`` (default: ``model`` itself) or given as ``db_desc``. Returns (recall, db_desc)."""
    if db_desc is None:
        db_desc = describe(
            db_model or model, [r.load() for r in places.database], device=device, batch_size=batch_size
        )
    q_desc = describe(model, queries, device=device, batch_size=batch_size)
    return recall_on_places(q_desc, db_desc, places, ns), db_desc
