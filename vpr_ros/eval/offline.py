"""Evaluate a model on a place dataset under transmission degradations.

The database is described once at full quality (the map a robot builds with its own
camera); the queries are sent through each simulated link, described, and matched against
the map. Results: recall@N per degradation with bytes/frame, JSON, and plots.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vpr_ros.core.errors import DatasetError
from vpr_ros.core.extract import DescriptorExtractor
from vpr_ros.core.geometry import Features, OrbExtractor
from vpr_ros.core.mapdb import MapEntry, PlaceMap
from vpr_ros.core.provenance import descriptor_source
from vpr_ros.core.transmission import TransmissionConfig, Transmitter
from vpr_ros.data.places import ImageRecord, PlaceDataset
from vpr_ros.eval.metrics import RECALL_NS, EvalResult, recall_at_n, save_results_json
from vpr_ros.eval.plots import plot_match_montage, plot_recall_curves, plot_recall_vs_bytes

log = logging.getLogger(__name__)


def map_from_records(
    extractor: DescriptorExtractor,
    records: Sequence[ImageRecord],
    *,
    model: str,
    index: str = "flat",
    progress: bool = True,
    local_features: OrbExtractor | None = None,
) -> tuple[PlaceMap, np.ndarray, list[tuple[int, str]]]:
    """Describe ``records`` and put them in a new map.

    Returns the map, the record index of each map entry (map id -> record position), and
    the records skipped with their reasons. The map records which weights made it
    (:func:`~vpr_ros.core.provenance.descriptor_source`). With ``local_features`` it also stores
    each place's ORB features (for geometric verification of loop closures against the map).
    """
    feats: list[Features] = []

    def orb(image: np.ndarray) -> np.ndarray:  # called once per image that loaded, in order
        feats.append(local_features(image))
        return image

    ext = extractor.extract_stream(
        records, load=ImageRecord.load, transform=orb if local_features is not None else None,
        total=len(records), desc="map", progress=progress
    )
    place_map = PlaceMap(extractor.dim, index, model=model, descriptor_source=descriptor_source(extractor))
    if local_features is not None:
        place_map.enable_local_features(local_features.settings)
    entries = []
    for i in ext.indices:
        rec = records[int(i)]
        pos = (float(rec.position[0]), float(rec.position[1]), 0.0) if rec.position else None
        entries.append(MapEntry(stamp=float(rec.stamp or 0.0), frame_id=rec.sequence or "",
                                source=str(rec.path), position=pos))
    if len(ext.indices):
        place_map.add(ext.descriptors, entries, features=feats if local_features is not None else None)
    return place_map, ext.indices, ext.skipped


@dataclass
class DegradationRun:
    """What one degradation produced, beyond its recall numbers (for montages and studies)."""

    config: TransmissionConfig
    result: EvalResult
    predictions: np.ndarray  # (Q_ok, K) database record indices, -1 when missing
    query_indices: np.ndarray  # (Q_ok,) query record positions
    scores: np.ndarray  # (Q_ok, K)
    samples: dict[int, np.ndarray] = field(default_factory=dict)  # query position -> received image


def evaluate_dataset(
    dataset: PlaceDataset,
    extractor: DescriptorExtractor,
    degradations: Sequence[TransmissionConfig],
    *,
    model_label: str,
    k: int = max(RECALL_NS),
    sample_queries: int = 8,
    progress: bool = True,
) -> list[DegradationRun]:
    """Recall@N of ``extractor`` on ``dataset`` for each degradation of the queries."""
    place_map, db_index, db_skipped = map_from_records(
        extractor, dataset.database, model=model_label, progress=progress
    )
    if len(place_map) == 0:
        raise DatasetError(f"{dataset.name}: no database image could be described")
    positives = dataset.positives()
    n_q = len(dataset.queries)
    sample_at = set(np.linspace(0, n_q - 1, num=min(sample_queries, n_q), dtype=int).tolist())
    positions = {id(rec): i for i, rec in enumerate(dataset.queries)}
    runs = []
    for cfg in degradations:
        tx = Transmitter(cfg)
        samples: dict[int, np.ndarray] = {}

        def load(rec: ImageRecord, tx: Transmitter = tx, samples: dict = samples) -> np.ndarray:
            received = tx.process(rec.load()).image
            pos = positions[id(rec)]
            if pos in sample_at:
                samples[pos] = received
            return received

        ext = extractor.extract_stream(
            dataset.queries, load=load, total=n_q, desc=f"queries {cfg.label}", progress=progress
        )
        if len(ext.indices) == 0:
            raise DatasetError(f"{dataset.name}: no query image could be described under {cfg.label}")
        scores, ids = place_map.search(ext.descriptors, min(k, len(place_map)))
        preds = np.where(ids >= 0, db_index[np.clip(ids, 0, None)], -1)
        recall = recall_at_n(preds, [positives[int(i)] for i in ext.indices])
        stats = tx.stats
        result = EvalResult.from_recall(
            dataset.name, model_label, cfg.label, recall,
            bytes_per_frame=float(stats["mean_bytes"]) if stats["frames"] else None,
            kbps=float(stats.get("kbps", 0.0)),
            # bitrate links: the budget and the frames over it (TransmittedFrame.over_budget)
            **({"budget_kbps": stats["budget_kbps"], "frames_over_budget": int(stats["over_budget"]),
                "frames_sent": int(stats["frames"])} if stats.get("budget_kbps") is not None else {}),
            queries_skipped=len(ext.skipped),
            database_skipped=len(db_skipped),
            database_size=len(place_map),
        )
        log.info("%s: R@1 %.3f over %d queries", result.label, recall.get(1, float("nan")), recall.n_queries)
        runs.append(DegradationRun(cfg, result, preds, ext.indices, scores, samples))
    return runs


def per_query_sections(runs: Sequence[DegradationRun], dataset: PlaceDataset) -> dict[str, Any]:
    """The per-query part of ``results.json``, for tools that score matches themselves.

    ``dataset``: its name, ground truth, database and query image names (list positions are the
    indices used below) and each query's correct database indices. ``per_query``: for each
    degradation label, one entry per described query: ``query`` index, ``top_k`` database indices
    best first, their ``scores`` (higher = more similar), and ``first_correct``, the rank of the first
    correct match (-1: none in the top K; null: the query has no positive)."""
    positives = dataset.positives()
    per_query: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        rows = []
        for row, q in enumerate(run.query_indices.tolist()):
            top = [int(p) for p in run.predictions[row] if p >= 0]
            scores = [round(float(s), 6) for s, p in zip(run.scores[row], run.predictions[row], strict=True)
                      if p >= 0]
            pos = set(positives[q].tolist())
            first = next((rank for rank, p in enumerate(top) if p in pos), -1) if pos else None
            rows.append({"query": int(q), "top_k": top, "scores": scores, "first_correct": first})
        per_query[run.result.degradation] = rows
    return {
        "dataset": {
            "name": dataset.name,
            "ground_truth": dataset.ground_truth.describe(),
            "database": [r.name for r in dataset.database],
            "queries": [r.name for r in dataset.queries],
            "positives": [p.tolist() for p in positives],
        },
        "per_query": per_query,
    }


def write_report(
    runs: Sequence[DegradationRun], dataset: PlaceDataset, out_dir: str | os.PathLike, *, top_k: int = 4
) -> dict[str, Path]:
    """Write results JSON, recall@N and recall-vs-bytes plots, and one match montage per run."""

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = [r.result for r in runs]
    paths = {"results": out / "results.json"}
    save_results_json(results, paths["results"], sections=per_query_sections(runs, dataset))
    paths["recall_curves"] = plot_recall_curves(results, out / "recall_at_n.png")
    try:
        paths["recall_vs_bytes"] = plot_recall_vs_bytes(results, out / "recall_vs_bytes.png")
    except ValueError as exc:  # e.g. a single degradation without byte counts
        log.info("no recall-vs-bytes plot: %s", exc)
    positives = dataset.positives()
    for run in runs:
        rows = [int(i) for i in run.query_indices if int(i) in run.samples]
        if not rows:
            continue
        where = {int(q): j for j, q in enumerate(run.query_indices)}
        queries, retrieved, flags, titles = [], [], [], []
        for q in rows:
            preds = [int(p) for p in run.predictions[where[q]][:top_k] if p >= 0]
            queries.append(run.samples[q])
            retrieved.append([dataset.database[p].load() for p in preds])
            flags.append([p in set(positives[q].tolist()) for p in preds])
            titles.append(dataset.queries[q].name[:18])
        paths[f"montage_{run.config.label}"] = plot_match_montage(
            queries, retrieved, flags, out / f"montage_{run.config.label}.png", titles=titles
        )
    return paths
