"""Loop-closure evaluation: precision-recall of the detector on a sequence with a loop ground truth.

Runs :class:`~vpr_ros.core.loop_closure.LoopClosureDetector` over a whole sequence with every top-k
candidate verified (:func:`run_sequence`), sweeps the operating point afterwards (:func:`decisions`,
:func:`operating_stats`, :func:`pr_curve`, :func:`choose_operating_point`), and evaluates RTAB-Map's
``rtabmap_loop`` set with and without verification under transmission degradations
(:func:`evaluate_loop_closure`, ``vpr-ros loop-eval``), which chose the node's default parameters.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from vpr_ros.core.extract import DescriptorExtractor
from vpr_ros.core.geometry import Features, OrbExtractor, VerificationConfig
from vpr_ros.core.loop_closure import (
    DEFAULT_EXCLUSION_WINDOW_S,
    DEFAULT_MIN_INLIERS,
    DEFAULT_SCORE_THRESHOLD,
    DEFAULT_TOP_K,
    Detection,
    LoopClosureConfig,
    LoopClosureDetector,
)
from vpr_ros.core.models import DEFAULT_WEIGHTS, resolve_model
from vpr_ros.core.models.resolve import DEFAULT_KEY
from vpr_ros.core.transmission import TransmissionConfig, Transmitter
from vpr_ros.data.places import load_rtabmap_loop
from vpr_ros.eval.metrics import PRCurve, json_default, loop_closure_pr, precision_recall
from vpr_ros.eval.plots import plot_pr_curves

log = logging.getLogger(__name__)
#: The packaged default student's label in reports (``structvpr_<card key>``).
DEFAULT_LABEL = f"structvpr_{DEFAULT_KEY}"

#: Sweeps of :func:`choose_operating_point`: candidates verified per query, inlier thresholds.
TOP_K_GRID = (1, 3, 5)
MIN_INLIERS_GRID = (15, 20, 25, 30, 40, 50)
#: ``min_inliers`` must exceed the worst false pair's inlier count by this factor.
INLIER_MARGIN = 1.25
#: Candidates this many frames from a ground-truth loop partner are "near misses", not clear false pairs.
NEAR_FRAMES = 2


@dataclass
class SequenceRun:
    """Per-query detections of a whole sequence (all top-k candidates verified), for post-hoc sweeps."""

    detections: list[Detection]
    gt: np.ndarray  # (N, N) bool, symmetric
    exclusion_window_frames: int
    seconds: dict[str, float] = field(default_factory=dict)

    def positives(self) -> int:
        """Queries whose ground truth has a loop among their eligible (windowed) frames."""
        w = self.exclusion_window_frames
        return int(sum(bool(self.gt[d.query_id, : max(0, d.query_id - w)].any()) for d in self.detections))


def run_sequence(
    descriptors: np.ndarray,
    features: Sequence[Features] | None,
    gt: np.ndarray,
    *,
    exclusion_window_frames: int = 10,
    top_k: int = 10,
    verification: VerificationConfig | None = None,
    rate_hz: float = 1.0,
) -> SequenceRun:
    """Run the detector over a sequence (frame i has id i, stamp i / rate_hz) with no score threshold,
    verifying every top-k candidate when ``features`` are given. The time window is disabled; the
    frame window ``exclusion_window_frames`` applies, as in :func:`~vpr_ros.eval.metrics.loop_closure_pr`."""
    g = np.asarray(gt).astype(bool)
    g = g | g.T
    verify = features is not None
    cfg = LoopClosureConfig(exclusion_window_s=0.0, exclusion_window_frames=exclusion_window_frames,
                            score_threshold=-1.0, top_k=top_k, max_closures=1, geometric_verification=verify,
                            verification=verification or VerificationConfig())
    det = LoopClosureDetector(cfg, feature_capacity=max(1, len(descriptors)))
    out = []
    t0 = time.perf_counter()
    for i, d in enumerate(descriptors):
        out.append(det.add(i, i / rate_hz, d, features=features[i] if verify else None, verify_all=True))
    return SequenceRun(out, g, exclusion_window_frames, {"detect_s": time.perf_counter() - t0})


def decisions(run: SequenceRun, *, top_k: int,
              min_inliers: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per query with a decision: (query index, match index, score), and whether the match is a true loop.

    The decision is what the detector would publish with ``score_threshold`` at -1: the best-score
    candidate among the first ``top_k`` that has at least ``min_inliers`` inliers (None: no verification,
    the top-1 candidate). Returns ``(pairs (M, 2), scores (M,), correct (M,))``.
    """
    pairs, scores, correct = [], [], []
    for d in run.detections:
        for c in d.candidates[:top_k]:
            if min_inliers is None or c.inliers >= min_inliers:
                pairs.append((c.query_id, c.match_id))
                scores.append(c.score)
                correct.append(bool(run.gt[c.query_id, c.match_id]))
                break
    return (np.asarray(pairs, dtype=np.int64).reshape(-1, 2), np.asarray(scores, dtype=np.float64),
            np.asarray(correct, dtype=bool))


def operating_stats(run: SequenceRun, *, top_k: int, min_inliers: int | None, score_threshold: float) -> dict:
    """Precision / recall / counts of the detector at one operating point on one sequence run."""
    pairs, scores, correct = decisions(run, top_k=top_k, min_inliers=min_inliers)
    acc = scores >= score_threshold
    tp, fp = int((acc & correct).sum()), int((acc & ~correct).sum())
    n_pos = run.positives()
    wrong = pairs[acc & ~correct]
    return {"precision": tp / (tp + fp) if tp + fp else 1.0, "recall": tp / n_pos if n_pos else 0.0,
            "true_positives": tp, "false_positives": fp, "positives": n_pos,
            "false_pairs_1based": [[int(a) + 1, int(b) + 1] for a, b in wrong]}


def pr_curve(run: SequenceRun, *, top_k: int, min_inliers: int | None) -> PRCurve | None:
    """Precision-recall over the score threshold (None when nothing is detected)."""
    pairs, scores, correct = decisions(run, top_k=top_k, min_inliers=min_inliers)
    if len(scores) == 0:
        return None
    curve = precision_recall(scores, correct, n_positives=max(run.positives(), int(correct.sum()), 1))
    curve.query_indices, curve.match_indices = pairs[:, 0], pairs[:, 1]
    return curve


def _between(low: float, high: float) -> float:
    """The midpoint of (low, high], rounded to 4 decimals when that stays inside the interval."""
    mid = 0.5 * (low + high)
    r = round(mid, 4)
    return r if low < r <= high else mid


def max_false_inliers(runs: dict[str, SequenceRun], *, near_frames: int = NEAR_FRAMES) -> int:
    """The most inliers any clearly wrong candidate reached in any run (the verifier's worst false pair).

    Candidates within ``near_frames`` frames of one of the query's ground-truth loop partners are left
    out: the ground truth marks a band of about five frames per revisit, and the frames just outside it
    show the same place (they verify with a correct relative pose), so they say nothing about the
    verifier's false-positive margin. They still count as false in every precision figure.
    """
    worst = 0
    for r in runs.values():
        for d in r.detections:
            partners = np.nonzero(r.gt[d.query_id])[0]
            for c in d.candidates:
                if r.gt[c.query_id, c.match_id]:
                    continue
                if partners.size and np.abs(partners - c.match_id).min() <= near_frames:
                    continue
                worst = max(worst, int(c.inliers))
    return worst


def choose_operating_point(
    runs: dict[str, SequenceRun],
    *,
    top_ks: Sequence[int] = TOP_K_GRID,
    min_inliers_grid: Sequence[int] = MIN_INLIERS_GRID,
    inlier_margin: float = INLIER_MARGIN,
) -> dict[str, Any]:
    """The (top_k, min_inliers, score_threshold) with the best worst-case recall at precision 1.0 over all
    ``runs`` (one per link condition).

    ``min_inliers`` must be at least ``inlier_margin`` times the inliers of the worst false pair seen in
    any run (:func:`max_false_inliers`), so precision does not hang on a single inlier. The threshold sits
    halfway between the highest-scoring false decision of any run and the next true one above it; with no
    false decision it is the lowest true decision score rounded down to 0.01. Ties go to the larger mean
    recall, then more inliers (safer), then fewer candidates (less verification work per frame).
    """
    worst = max_false_inliers(runs)
    allowed = [m for m in min_inliers_grid if m >= inlier_margin * worst] or [max(min_inliers_grid)]
    best: tuple | None = None
    for k in top_ks:
        for m in allowed:
            per = [decisions(r, top_k=k, min_inliers=m) for r in runs.values()]
            fp_scores = np.concatenate([s[~c] for _, s, c in per])
            tp_scores = np.concatenate([s[c] for _, s, c in per])
            if fp_scores.size:
                top_fp = float(fp_scores.max())
                above = tp_scores[tp_scores > top_fp]
                tau = _between(top_fp, float(above.min())) if above.size else math.nextafter(top_fp, 2.0)
            elif tp_scores.size:
                tau = math.floor(float(tp_scores.min()) * 100) / 100
            else:
                tau = 1.0
            recalls = [operating_stats(r, top_k=k, min_inliers=m, score_threshold=tau)["recall"]
                       for r in runs.values()]
            key = (min(recalls), float(np.mean(recalls)), m, -k)
            if best is None or key > best[0]:
                best = (key, {"top_k": k, "min_inliers": m, "score_threshold": float(tau)})
    assert best is not None
    point = best[1]
    point["max_false_inliers"] = worst
    point["per_condition"] = {name: operating_stats(r, top_k=point["top_k"], min_inliers=point["min_inliers"],
                                                    score_threshold=point["score_threshold"])
                              for name, r in runs.items()}
    return point


def card_entry(point: dict[str, Any], *, date: str | None = None) -> dict[str, Any]:
    """The model card's ``loop_closure`` entry of an operating point (:func:`choose_operating_point`)."""
    per = ", ".join(f"{k} P {v['precision']:.2f} R {v['recall']:.2f}"
                    for k, v in point["per_condition"].items())
    day = date or time.strftime("%Y-%m-%d")
    return {"score_threshold": float(point["score_threshold"]), "top_k": int(point["top_k"]),
            "min_inliers": int(point["min_inliers"]),
            "measured": f"vpr-ros loop-eval on rtabmap_loop, {day}: {per}"}


# --------------------------------------------------------------------------- rtabmap_loop evaluation

LOOP_EVAL_DEGRADATIONS = ("none", "jpeg:10", "h264:40")


def describe_sequence(extractor: DescriptorExtractor, images: Sequence[np.ndarray]) -> np.ndarray:
    """Global descriptors (N, D) of a sequence of RGB images."""
    return extractor(list(images))


def evaluate_loop_closure(
    root: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    models: Sequence[tuple[str, Any]] | None = None,
    degradations: Sequence[str] = LOOP_EVAL_DEGRADATIONS,
    exclusion_window_frames: int = 10,
    max_top_k: int = max(TOP_K_GRID),
    verification: VerificationConfig | None = None,
    device: str = "cpu",
    ship_model: str | None = None,
) -> dict[str, Any]:
    """Loop-closure precision-recall on RTAB-Map's ``rtabmap_loop`` sequence; writes JSON and plots.

    ``models``: ``(label, weights)`` pairs for :func:`~vpr_ros.core.models.resolve_model` (weights None =
    ImageNet-initialised ``structvpr_mobilenetv2``); default: that model, plus the packaged student when
    its weights exist. Each degradation sends the whole sequence through one simulated link
    (:class:`~vpr_ros.core.transmission.Transmitter`), as a robot streaming to a remote SLAM back end
    would. The operating point is chosen on ``ship_model`` (default: the model ``resolve_model()`` picks
    by default) over all degradations together.
    """
    vcfg = verification or VerificationConfig()
    # Verify with the lowest inlier threshold of the sweep; higher ones are applied afterwards.
    sweep_cfg = replace(vcfg, min_inliers=min(MIN_INLIERS_GRID))
    rtab = load_rtabmap_loop(root)
    records, gt = rtab.database, rtab.truth_matrix()
    images = [r.load() for r in records]
    if models is None:
        models = [("structvpr_imagenet", None)]
        if DEFAULT_WEIGHTS.is_file():
            models.append((DEFAULT_LABEL, str(DEFAULT_WEIGHTS)))
    if ship_model is None:
        ship_model = DEFAULT_LABEL if any(m == DEFAULT_LABEL for m, _ in models) else models[0][0]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    configs = [TransmissionConfig.parse(s) for s in degradations]
    orb = OrbExtractor(vcfg)
    received: dict[str, tuple[list[np.ndarray], float]] = {}
    for cfg in configs:
        tx = Transmitter(cfg)
        frames = [tx.process(im).image for im in images]
        received[cfg.label] = (frames, float(tx.stats["mean_bytes"]))
    feats = {label: [orb(im) for im in frames] for label, (frames, _) in received.items()}
    report: dict[str, Any] = {
        "dataset": str(root), "frames": len(records), "gt_loop_pairs": int(np.asarray(gt).sum()),
        "exclusion_window_frames": exclusion_window_frames, "verification": asdict(vcfg),
        "models": {}, "plots": {},
    }
    all_runs: dict[str, dict[str, SequenceRun]] = {}
    for label, weights in models:
        model = resolve_model(weights, None if weights else "structvpr_mobilenetv2")
        ext = DescriptorExtractor(model, device=device)
        runs: dict[str, SequenceRun] = {}
        mrep: dict[str, Any] = {"weights": weights, "conditions": {}}
        summary: dict[str, Any] = {}
        for cfg in configs:
            frames, mean_bytes = received[cfg.label]
            t0 = time.perf_counter()
            desc = describe_sequence(ext, frames)
            t_desc = time.perf_counter() - t0
            run = run_sequence(desc, feats[cfg.label], gt, exclusion_window_frames=exclusion_window_frames,
                               top_k=max_top_k, verification=sweep_cfg)
            run.seconds["describe_s"] = t_desc
            runs[cfg.label] = run
            base = loop_closure_pr(desc @ desc.T, gt, exclude_window=exclusion_window_frames)
            curves = {"descriptor only": base}
            cond = {"bytes_per_frame": mean_bytes, "positives": run.positives(),
                    "descriptor_only": _curve_summary(base), "verified": {}}
            summary[f"{cfg.label}: descriptor only"] = base
            for m in sorted({min(MIN_INLIERS_GRID), DEFAULT_MIN_INLIERS, max(MIN_INLIERS_GRID)}):
                c = pr_curve(run, top_k=DEFAULT_TOP_K, min_inliers=m)
                if c is not None:
                    curves[f"verified top-{DEFAULT_TOP_K}, >= {m} inliers"] = c
                    cond["verified"][f"top{DEFAULT_TOP_K}_min{m}"] = _curve_summary(c)
                    if m == DEFAULT_MIN_INLIERS:
                        summary[f"{cfg.label}: verified (defaults)"] = c
            mrep["conditions"][cfg.label] = cond
            name = f"pr_{label}_{cfg.label}.png"
            plot_pr_curves(curves, out / name, title=f"rtabmap_loop loop closure: {label}, {cfg.label}")
            report["plots"][f"{label}/{cfg.label}"] = name
            log.info("%s / %s: descriptor-only AP %.3f R@100P %.3f", label, cfg.label,
                     base.average_precision, base.recall_at_100_precision)
        name = f"pr_{label}_summary.png"
        plot_pr_curves(summary, out / name, title=f"rtabmap_loop loop closure: {label}, links compared")
        report["plots"][f"{label}/summary"] = name
        mrep["operating_point"] = choose_operating_point(runs)
        report["models"][label] = mrep
        all_runs[label] = runs
    ship = report["models"][ship_model]["operating_point"]
    report["shipped"] = {"model": ship_model, "exclusion_window_s": DEFAULT_EXCLUSION_WINDOW_S,
                         "top_k": ship["top_k"], "min_inliers": ship["min_inliers"],
                         "score_threshold": ship["score_threshold"], "geometric_verification": True}
    report["defaults_in_code"] = {"score_threshold": DEFAULT_SCORE_THRESHOLD, "top_k": DEFAULT_TOP_K,
                                  "min_inliers": DEFAULT_MIN_INLIERS}
    # How the shipped (code default) point does on every model and condition.
    report["at_defaults"] = {
        label: {cond: operating_stats(run, top_k=DEFAULT_TOP_K, min_inliers=DEFAULT_MIN_INLIERS,
                                      score_threshold=DEFAULT_SCORE_THRESHOLD)
                for cond, run in runs.items()}
        for label, runs in all_runs.items()}
    text = json.dumps(report, indent=2, default=json_default, allow_nan=False)
    (out / "loop_closure.json").write_text(text + "\n", encoding="utf-8")
    report["json"] = str(out / "loop_closure.json")
    return report


def _curve_summary(c: PRCurve) -> dict[str, Any]:
    return {"average_precision": c.average_precision, "recall_at_100_precision": c.recall_at_100_precision,
            "best_f1": c.best_f1, "best_f1_threshold": c.best_f1_threshold, "n_positives": c.n_positives,
            "n_decisions": int(len(c.scores))}

