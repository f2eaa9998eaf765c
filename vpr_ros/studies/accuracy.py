"""The accuracy study: models x datasets x link degradations -> bytes/frame and recall@N.

For every dataset the map is built from the high-quality images (the robot's prior map) and the queries
are sent, in order and as one stream, through each simulated link (:mod:`.transmission`); bytes/frame are
the real encoded payloads. Each model runs at its own checkpoint's input size; the ImageNet-initialised
student (no checkpoint) at the dataset's reference size (:data:`REFERENCE_SIZES`). On ``rtabmap_loop``
the whole sequence goes through the link and loop closure is scored at the shipped operating point
(:mod:`.loop_closure`). Outputs: ``results.json`` and caches under ``StudyConfig.out``, and a results page
(tables + figures) whose generated block is replaced on each run (hand-written text around it is kept).

Caches (``out/cache``): per (dataset, link) the bytes per frame, per (dataset, link, model) the
descriptors, per (dataset, link) the geometric verification of loop candidates; each keyed by a hash of
what produced it (records, link spec, model weights and input size), so a re-run only computes what is new.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from PIL import Image
from tqdm import tqdm

from vpr_ros import paths
from vpr_ros.core.errors import DatasetError
from vpr_ros.core.extract import DescriptorExtractor
from vpr_ros.core.fileio import atomic_path, atomic_write_text
from vpr_ros.core.geometry import OrbExtractor, VerificationConfig, verify_pair
from vpr_ros.core.loop_closure import (
    DEFAULT_EXCLUSION_WINDOW_S,
    DEFAULT_MIN_INLIERS,
    DEFAULT_SCORE_THRESHOLD,
    DEFAULT_TOP_K,
    Detection,
    LoopCandidate,
)
from vpr_ros.core.models import create_model, load_model
from vpr_ros.core.models.card import weights_digest
from vpr_ros.core.transmission import STANDARD_LINKS, TransmissionConfig, Transmitter
from vpr_ros.data.places import (
    GroundTruth,
    ImageRecord,
    PlaceDataset,
    load_ie_tower,
    load_kitti,
    load_nordland,
    load_rtabmap_loop,
    load_tokyo_pair,
    rtabmap_revisit,
)
from vpr_ros.eval.loop_closure import SequenceRun, choose_operating_point, operating_stats, pr_curve
from vpr_ros.eval.metrics import (
    RECALL_NS,
    EvalResult,
    PRCurve,
    json_default,
    loop_closure_pr,
    recall_at_n,
    sequence_recall,
)
from vpr_ros.eval.plots import plot_match_montage, plot_recall_vs_sequence_length

log = logging.getLogger(__name__)

WEIGHTS_DIR = paths.WEIGHTS_DIR
LOQI_WEIGHTS = WEIGHTS_DIR / "structvpr_mobilenetv2_loqi.pt"
STRUCTVPR_WEIGHTS = WEIGHTS_DIR / "structvpr_mobilenetv2_kitti.pt"
SCICEVPR_WEIGHTS = WEIGHTS_DIR / "scicevpr_dinov2.pt"

#: The links of the study, in table order.
DEGRADATIONS = (
    "none",
    "jpeg:50",
    "jpeg:20",
    "jpeg:10",
    "jpeg:5",
    "resize:0.5",
    "resize:0.25",
    "h264:30",
    "h264:40",
    "h264:50",
    "h265:30",
    "h265:40",
    "h265:50",
    "kbps:100@10:h264",
)
QUICK_DEGRADATIONS = ("none", "jpeg:50", "jpeg:10", "jpeg:5", "h264:40")
MODEL_KEYS = ("imagenet", "finetuned", "loqi", "structvpr", "scicevpr")
DATASET_KEYS = ("nordland", "ie_tower", "kitti00", "kitti05", "rtabmap_loop", "tokyo_pair")
#: Input (H, W) of the ImageNet-initialised student per dataset: about half the frame size (Nordland: its
#: 32x64 thumbnails as they are; KITTI: the StructVPR study's 96x320).
REFERENCE_SIZES = {
    "nordland": (32, 64),
    "ie_tower": (90, 160),
    "kitti00": (96, 320),
    "kitti05": (96, 320),
    "rtabmap_loop": (192, 256),
    "tokyo_pair": (240, 320),
}
#: The link whose matches the montages show (per-frame, so single frames can be re-sent for pictures).
MONTAGE_LINK = "jpeg:10"
#: A gap below this (R@1 fraction) is too small for a meaningful "share recovered".
MIN_GAP = 0.02
#: Links of the recall@N figure panels.
CURVE_LINKS = ("none", "jpeg:10", "resize:0.25", "h265:40")
#: Sequence matching (docs/sequence.md): R@1 against the sequence length L of this model on this set,
#: over the standard links (L = 1 is the single frame).
SEQUENCE_SET, SEQUENCE_MODEL = "nordland", "loqi"
SEQUENCE_LINKS = STANDARD_LINKS
SEQUENCE_LENGTHS = (1, 5, 10, 20)
SEQUENCE_CANDIDATES = 50
GEN_BEGIN = "<!-- BEGIN GENERATED: scripts/accuracy_study.py; edits inside are overwritten -->"
GEN_END = "<!-- END GENERATED -->"
CACHE_VERSION = 1


# --------------------------------------------------------------------------- configuration


@dataclass
class StudyConfig:
    """What to run. ``finetuned``: checkpoint of the no-distillation control (None: left out)."""

    out: Path = Path("results/accuracy")
    page: Path | None = Path("docs/results.md")
    shared: Path = field(default_factory=paths.shared_root)
    models: tuple[str, ...] = ("imagenet", "finetuned", "loqi", "structvpr", "scicevpr")
    datasets: tuple[str, ...] = DATASET_KEYS
    degradations: tuple[str, ...] = DEGRADATIONS
    finetuned: Path | None = None
    finetuned_info: dict[str, Any] = field(default_factory=dict)
    nordland_every: int = 1  # every N-th held-out Nordland place
    ie_tower_every: int = 2  # every N-th IE tower gallery and query image
    kitti_query_every: int = 1
    batch_size: int = 64
    device: str = "auto"
    quick: bool = False
    progress: bool = True
    reference_sizes: dict[str, tuple[int, int]] = field(default_factory=lambda: dict(REFERENCE_SIZES))
    loop_models: tuple[str, ...] | None = None  # models scored for loop closure (None: all)
    loop_links: tuple[str, ...] | None = None  # links scored for loop closure (None: all)

    @classmethod
    def quick_preset(cls) -> StudyConfig:
        """A small subset for tests and smoke runs (well under a minute on 2 CPU cores)."""
        return cls(
            out=Path("results/accuracy_quick"),
            page=None,
            models=("imagenet", "loqi", "scicevpr"),
            datasets=("nordland", "rtabmap_loop", "tokyo_pair"),
            degradations=QUICK_DEGRADATIONS,
            nordland_every=10,
            kitti_query_every=4,
            reference_sizes={**REFERENCE_SIZES, "rtabmap_loop": (96, 128), "tokyo_pair": (96, 128)},
            loop_models=("loqi",),
            loop_links=("none", "jpeg:10"),
            quick=True,
        )


@dataclass
class StudyModel:
    """One model of the study: ``weights`` None means ImageNet-initialised ``structvpr_mobilenetv2``."""

    key: str
    label: str
    weights: Path | None
    trained_on: str
    available: bool = True
    reason: str = ""
    sha256: str = ""

    def identity(self, size: tuple[int, int] | None) -> str:
        return f"{self.key}:{self.sha256 or 'imagenet'}:{size}"

    def load(self, size: tuple[int, int]) -> Any:
        """The eval-mode model (checkpoint input size; ``size`` for the ImageNet model)."""

        if self.weights is None:
            net = create_model("structvpr_mobilenetv2", pretrained=True).eval()
            net.preprocess = dataclasses.replace(net.preprocess, input_size=tuple(size))
            return net
        return load_model(self.weights)


def _packaged(key: str, label: str, weights: Path | str | None, trained_on: str, missing: str) -> StudyModel:
    """A model with a checkpoint: available when the file exists, else ``missing`` says why."""
    ok = bool(weights) and Path(weights).is_file()
    return StudyModel(key, label, weights, trained_on, available=ok, reason="" if ok else missing)


def build_models(cfg: StudyConfig) -> list[StudyModel]:
    """The models named in ``cfg.models``; those without weights are kept with ``available=False``."""
    out = []
    for key in cfg.models:
        if key == "imagenet":
            m = StudyModel(key, "ImageNet-initialised student (no VPR training)", None, "ImageNet only")
        elif key == "finetuned":
            m = _packaged(key, "fine-tuned, no distillation (LoQI recipe, triplet only)", cfg.finetuned,
                          "Nordland (other places), JPEG q10 queries",
                          "not trained (pass StudyConfig.finetuned)")
        elif key == "loqi":
            m = _packaged(key, "LoQI-VPR distilled (packaged Nordland student)", LOQI_WEIGHTS,
                          "Nordland (other places), JPEG q10 queries", f"{LOQI_WEIGHTS} missing")
        elif key == "structvpr":
            m = _packaged(key, "StructVPR distilled (KITTI 05)", STRUCTVPR_WEIGHTS, "KITTI 05",
                          f"{STRUCTVPR_WEIGHTS} missing")
        elif key == "scicevpr":
            m = _packaged(
                key, "SciceVPR (DINOv2 student)",
                SCICEVPR_WEIGHTS if SCICEVPR_WEIGHTS.is_file() else None, "-",
                "no weights: SciceVPR needs a DINOv2 ViT backbone and none can be had on this machine (no "
                "DINOv2 or published VPR checkpoints, no network), so no SciceVPR student was trained; "
                f"{SCICEVPR_WEIGHTS.name} is absent (docs/scicevpr.md)",
            )
        else:
            raise ValueError(f"unknown model {key!r}; expected one of {MODEL_KEYS}")
        if m.available and m.weights is not None:
            m.sha256 = weights_digest(Path(m.weights))  # the weights, not the bytes: cards may change
        out.append(m)
    return out


# --------------------------------------------------------------------------- datasets


#: Sets whose whole sequence, database then queries, goes through the link (a robot streaming to a remote
#: SLAM back end); loop closure is scored on it. Other sets send only their queries.
LOOP_SETS = ("rtabmap_loop",)


def stream(s: PlaceDataset) -> list[ImageRecord]:
    """The frames the study sends through the link, in order."""
    return s.database + s.queries if s.name in LOOP_SETS else s.queries


def query_positions(s: PlaceDataset) -> np.ndarray:
    """Where the queries are in :func:`stream`."""
    start = len(s.database) if s.name in LOOP_SETS else 0
    return np.arange(start, start + len(s.queries))


def recall_applies(s: PlaceDataset) -> bool:
    """Whether recall means anything: a single database image (the Tokyo pair) gives similarity only."""
    return len(s.database) > 1


def loop_truth(s: PlaceDataset) -> np.ndarray | None:
    """The ``(N, N)`` loop matrix of :func:`stream` (loop-closure evaluation); None for other sets."""
    if s.name not in LOOP_SETS:
        return None
    frames = stream(s)
    return dataclasses.replace(s, database=frames, queries=frames).truth_matrix()


def set_identity(s: PlaceDataset) -> str:
    """Hash of the records (database, then the stream) that keys the caches."""
    recs = [str(r.path) for r in s.database] + ["|"] + [str(r.path) for r in stream(s)]
    return hashlib.sha1("\n".join(recs).encode()).hexdigest()[:16]


def domains(s: PlaceDataset) -> dict[str, str]:
    """Per model key, whether the set is in its training domain, out of it, or its training data."""
    if s.name == "nordland":
        return dict(_DOMAIN_NORDLAND)
    dom = dict(_DOMAIN_OOD)
    if s.name == "kitti05":
        dom["structvpr"] = "TRAINING DATA (not a test)"
    elif s.name == "kitti00":
        dom["structvpr"] = "in domain (KITTI, another street than its training sequence 05)"
    return dom


def held_out_split(weights: Path = LOQI_WEIGHTS) -> dict[str, float] | None:
    """The Nordland place split recorded in a packaged student's sidecar (None when absent)."""
    try:
        split = json.loads(weights.with_suffix(".json").read_text())["split"]
        return {k: float(split[k]) for k in ("block", "val_every", "val_offset")}
    except (OSError, KeyError, TypeError, ValueError):
        return None


def is_held_out(frame: int | None, split: dict[str, float]) -> bool:
    return frame is not None and int(frame // split["block"]) % int(split["val_every"]) == int(
        split["val_offset"]
    )


_DOMAIN_NORDLAND = {
    "imagenet": "no VPR training",
    "finetuned": "in domain (other Nordland places)",
    "loqi": "in domain (other Nordland places)",
    "structvpr": "out of domain (KITTI)",
}
_DOMAIN_OOD = {
    "imagenet": "no VPR training",
    "finetuned": "out of domain (Nordland)",
    "loqi": "out of domain (Nordland)",
    "structvpr": "out of domain (KITTI)",
}


def load_sets(cfg: StudyConfig) -> list[PlaceDataset]:
    """The datasets named in ``cfg.datasets`` from ``cfg.shared/data``, each named by its key."""
    data = Path(cfg.shared) / "data"
    sets = []
    for key in cfg.datasets:
        if key == "nordland":
            split = held_out_split()
            if split is None:
                raise DatasetError(
                    f"{LOQI_WEIGHTS.with_suffix('.json')}: no place split; cannot hold out places"
                )
            ds = load_nordland(data / "nordland_64x32")
            db = [r for r in ds.database if is_held_out(r.frame_index, split)]
            qs = [r for r in ds.queries if is_held_out(r.frame_index, split)]
            keep = {r.frame_index for r in qs[:: cfg.nordland_every]}
            db = [r for r in db if r.frame_index in keep] if cfg.nordland_every > 1 else db
            qs = [r for r in qs if r.frame_index in keep]
            sets.append(dataclasses.replace(
                ds, name=key, database=db, queries=qs,
                ground_truth=GroundTruth("frame", tolerance=2, text="same place within +-2 frames"),
                title="Nordland winter -> summer, held-out places",
                notes="the places held out from the LoQI student's training (blocks of "
                f"{split['block']:g} frames, every {split['val_every']:g}th from "
                f"{split['val_offset']:g}); 64x32 grey thumbnails",
            ))
        elif key == "ie_tower":
            ds = load_ie_tower(data / "ie_tower", ground_truth="area").subsample(cfg.ie_tower_every)
            sets.append(dataclasses.replace(
                ds, name=key, title="IE tower (indoor office), gallery -> query",
                notes=f"one in {cfg.ie_tower_every} gallery and query images; queries and gallery come from "
                "the same videos 1 s apart (an easy near-duplicate test)",
            ))
        elif key in ("kitti00", "kitti05"):
            seq = key[-2:]
            recs = load_kitti(data / "kitti_first300", seq).database
            db = [r for r in recs if r.frame_index % 10 == 0]
            qs = [r for r in recs if r.frame_index % 10 in (3, 4, 5, 6, 7)][:: cfg.kitti_query_every]
            sets.append(PlaceDataset(
                key, db, qs, GroundTruth("distance", radius_m=6.0, text="within 6 m"),
                title=f"KITTI {seq} (first 300 frames), frames 3-7 after each database frame",
                notes="database every 10th frame (~7 m apart), queries 2-5 m from the nearest one: "
                "viewpoint offset + compression, no revisit (the StructVPR study's test protocol)",
            ))
        elif key == "rtabmap_loop":
            ds = rtabmap_revisit(load_rtabmap_loop(data / "rtabmap_loop"))
            half, n = len(ds.database), len(ds.database) + len(ds.queries)
            sets.append(dataclasses.replace(
                ds,
                title="RTAB-Map loop sequence (indoor corridor)",
                notes=f"recall: frames 1-{half} are the map, {half + 1}-{n} the queries; loop closure: the "
                "whole sequence through the link, as a robot streaming to a remote SLAM back end",
            ))
        elif key == "tokyo_pair":
            sets.append(dataclasses.replace(
                load_tokyo_pair(data / "tokyo_pair"), title="Tokyo 24/7, one query and its database match",
                notes="a single pair gives no recall: the cosine similarity of the received query to its "
                "true match is reported instead",
            ))
        else:
            raise ValueError(f"unknown dataset {key!r}; expected one of {DATASET_KEYS}")
    return sets


# --------------------------------------------------------------------------- caches


class _Cache:
    """Small files keyed by a hash of what produced them; a mismatching key is recomputed."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.described = 0
        self.reused = 0

    def _dir(self, set_key: str, link: str) -> Path:
        return self.root / set_key / link

    def get_array(self, set_key: str, link: str, name: str, key: str) -> np.ndarray | None:
        path = self._dir(set_key, link) / f"{name}.npz"
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                if str(z["key"]) != key:
                    return None
                return z["array"]
        except (OSError, KeyError, ValueError):
            return None

    def put_array(self, set_key: str, link: str, name: str, key: str, array: np.ndarray) -> None:

        path = self._dir(set_key, link) / f"{name}.npz"
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, key=np.array(key), array=array)

    def get_json(self, set_key: str, link: str, name: str, key: str) -> dict | None:
        path = self._dir(set_key, link) / f"{name}.json"
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return data["value"] if data.get("key") == key else None

    def put_json(self, set_key: str, link: str, name: str, key: str, value: Any) -> None:
        atomic_write_text(
            self._dir(set_key, link) / f"{name}.json",
            json.dumps({"key": key, "value": value}, default=json_default) + "\n",
        )


def _load() -> str:
    """The 1-minute load average, as text ("?" where the OS has none)."""
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except (AttributeError, OSError):
        return "?"


def _display_path(path: Path) -> str:
    """``path`` relative to the working directory when inside it (pages name repo paths), else absolute."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _hash(*parts: Any) -> str:
    return hashlib.sha1(json.dumps([CACHE_VERSION, *parts], default=str).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- the study


def gap_share(hq_ft: float, lq_ft: float, lq_distilled: float, *, min_gap: float = MIN_GAP) -> float | None:
    """Share of the high/low-quality recall gap that distillation recovers.

    ``(R@1_LQ(distilled) - R@1_LQ(finetuned)) / (R@1_HQ(finetuned) - R@1_LQ(finetuned))``; None when the
    gap (denominator) is below ``min_gap`` (too small to divide by). 1 = the whole gap closed, 0 = nothing,
    negative = distillation did worse than fine-tuning, > 1 = beyond the fine-tuned model's full quality.
    """
    gap = hq_ft - lq_ft
    if not (math.isfinite(gap) and gap >= min_gap):
        return None
    return (lq_distilled - lq_ft) / gap


def _bootstrap_share(
    hq: np.ndarray, lq: np.ndarray, dist: np.ndarray, *, n: int = 2000, seed: int = 0
) -> dict[str, Any] | None:
    """Paired bootstrap over queries (boolean hits at rank 1): the 5th percentile of the gap and the
    90 % interval of :func:`gap_share` (None where fewer than half the resamples have a gap)."""
    rng = np.random.default_rng(seed)
    m = len(hq)
    if m == 0:
        return None
    idx = rng.integers(0, m, size=(n, m))
    gap = hq[idx].mean(1) - lq[idx].mean(1)
    ok = gap > 0
    out: dict[str, Any] = {"gap_p5": float(np.percentile(gap, 5)), "share_ci90": None}
    if ok.mean() >= 0.5:
        share = (dist[idx].mean(1) - lq[idx].mean(1))[ok] / gap[ok]
        lo, hi = np.percentile(share, [5, 95])
        out["share_ci90"] = (float(lo), float(hi))
    return out


@dataclass
class _Link:
    """One link condition applied to one dataset's stream."""

    spec: str
    label: str
    stats: dict[str, Any]
    frames: list[np.ndarray] | None = None  # received images (None when everything came from the cache)


def _send(stream: Sequence[np.ndarray], spec: str, *, desc: str, progress: bool) -> _Link:

    cfg = TransmissionConfig.parse(spec)
    tx = Transmitter(cfg)
    frames, sizes = [], []
    for im in tqdm(stream, desc=desc, unit="frame", disable=not progress, leave=False):
        out = tx.process(im)
        frames.append(out.image)
        sizes.append(out.nbytes)
    st = tx.stats
    stats = {
        "bytes_per_frame": float(st["mean_bytes"]),
        "kbps_at_fps": float(st["kbps"]),
        "fps": cfg.fps,
        "mean_quality": st["mean_quality"],
        "over_budget": int(st["over_budget"]),
        "keyframes": int(st["keyframes"]),
        "frames": int(st["frames"]),
        "bytes_min": int(min(sizes)),
        "bytes_max": int(max(sizes)),
    }
    return _Link(spec, cfg.label, stats, frames)


def _describe(
    model: Any, images: Sequence[np.ndarray], *, batch: int, device: str, desc: str, progress: bool
) -> np.ndarray:

    ext = DescriptorExtractor(model, device=device, batch_size=batch)
    out = np.empty((len(images), ext.dim), dtype=np.float32)
    step = batch * 4
    for s in tqdm(range(0, len(images), step), desc=desc, unit="batch", disable=not progress, leave=False):
        out[s : s + step] = ext(images[s : s + step])
    return out


def _top_k(q: np.ndarray, db: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exhaustive inner-product search (descriptors are L2-normalised): (scores, ids), best first."""
    sim = q @ db.T
    k = min(k, db.shape[0])
    ids = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sim, ids, 1), ids


def run_study(cfg: StudyConfig, *, train_seconds: float = 0.0) -> dict[str, Any]:
    """Run the study (module docstring); return the summary written to ``cfg.out/results.json``."""
    t_start, cpu_start = time.perf_counter(), time.process_time()
    load_start = _load()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = _Cache(out / "cache")
    models = build_models(cfg)
    usable = [m for m in models if m.available]
    sets = load_sets(cfg)
    results: list[EvalResult] = []
    hits: dict[tuple[str, str, str], np.ndarray] = {}
    preds_by: dict[tuple[str, str, str], np.ndarray] = {}
    links: dict[str, dict[str, dict[str, Any]]] = {}
    pair_scores: dict[str, dict[str, dict[str, float]]] = {}
    loop: dict[str, Any] = {}
    sequence: dict[str, dict[str, float]] = {}  # link -> {L: R@1} (SEQUENCE_SET / SEQUENCE_MODEL)
    seconds: dict[str, float] = {"train_control": train_seconds}  # teacher (if absent) + finetuned
    for s in sets:
        t_set = time.perf_counter()
        log.info(
            "%s: %d database, %d streamed (%d queries)",
            s.name,
            len(s.database),
            len(stream(s)),
            len(s.queries),
        )
        loaded: dict[str, Any] = {}

        def net(m: StudyModel, s: PlaceDataset = s, loaded: dict = loaded) -> Any:
            if m.key not in loaded:
                loaded[m.key] = m.load(cfg.reference_sizes[s.name])
            return loaded[m.key]

        size_of = {m.key: (cfg.reference_sizes[s.name] if m.weights is None else None) for m in usable}
        # High-quality map descriptors.
        db_desc: dict[str, np.ndarray] = {}
        for m in usable:
            key = _hash(set_identity(s), "db", m.identity(size_of[m.key]))
            arr = cache.get_array(s.name, "_map", m.key, key)
            if arr is None:
                images = [r.load() for r in s.database]
                arr = _describe(
                    net(m),
                    images,
                    batch=cfg.batch_size,
                    device=cfg.device,
                    desc=f"{s.name} map {m.key}",
                    progress=cfg.progress,
                )
                cache.put_array(s.name, "_map", m.key, key, arr)
                cache.described += 1
            else:
                cache.reused += 1
            db_desc[m.key] = arr
        hq_stream: list[np.ndarray] | None = None
        links[s.name] = {}
        for spec in cfg.degradations:

            label = TransmissionConfig.parse(spec).label
            link_key = _hash(set_identity(s), spec)
            stats = cache.get_json(s.name, label, "link", link_key)
            descs: dict[str, np.ndarray] = {}
            keys = {m.key: _hash(link_key, m.identity(size_of[m.key])) for m in usable}
            for m in usable:
                arr = cache.get_array(s.name, label, m.key, keys[m.key])
                if arr is not None:
                    descs[m.key] = arr
            cache.reused += len(descs)
            link = _Link(spec, label, stats or {})
            if stats is None or len(descs) < len(usable):
                if hq_stream is None:
                    hq_stream = [r.load() for r in stream(s)]
                link = _send(hq_stream, spec, desc=f"{s.name} {label}", progress=cfg.progress)
                cache.put_json(s.name, label, "link", link_key, link.stats)
                for m in usable:
                    if m.key in descs:
                        continue
                    descs[m.key] = _describe(
                        net(m),
                        link.frames,
                        batch=cfg.batch_size,
                        device=cfg.device,
                        desc=f"{s.name} {label} {m.key}",
                        progress=cfg.progress,
                    )
                    cache.put_array(s.name, label, m.key, keys[m.key], descs[m.key])
                    cache.described += 1
            links[s.name][label] = link.stats
            for m in usable:
                q = descs[m.key][query_positions(s)]
                if not recall_applies(s):
                    sim = float(q[0] @ db_desc[m.key][0])
                    pair_scores.setdefault(s.name, {}).setdefault(m.key, {})[label] = sim
                    continue
                scores, ids = _top_k(q, db_desc[m.key], max(RECALL_NS))
                rec = recall_at_n(ids, s.positives())
                hits[(s.name, label, m.key)] = rec.first_hit
                preds_by[(s.name, label, m.key)] = ids
                if (s.name, m.key) == (SEQUENCE_SET, SEQUENCE_MODEL) and spec in SEQUENCE_LINKS:
                    sequence[label] = _sequence_curve(cache, s, label, keys[m.key], q, db_desc[m.key])
                results.append(
                    EvalResult.from_recall(
                        s.name,
                        m.key,
                        label,
                        rec,
                        bytes_per_frame=link.stats["bytes_per_frame"],
                        kbps_at_fps=link.stats["kbps_at_fps"],
                        database_size=len(s.database),
                    )
                )
            loop_models = [m for m in usable if cfg.loop_models is None or m.key in cfg.loop_models]
            if s.name in LOOP_SETS and loop_models and (cfg.loop_links is None or spec in cfg.loop_links):
                loop.setdefault(label, {"bytes_per_frame": link.stats["bytes_per_frame"], "models": {}})
                _loop_closure(
                    s,
                    label,
                    link,
                    descs,
                    loop_models,
                    cache,
                    loop[label],
                    hq_stream_loader=lambda s=s: [r.load() for r in stream(s)],
                    progress=cfg.progress,
                )
        seconds[s.name] = time.perf_counter() - t_set
        log.info("%s done in %.0f s", s.name, seconds[s.name])
    seconds["total"] = time.perf_counter() - t_start + train_seconds
    seconds["cpu_evaluation"] = time.process_time() - cpu_start  # all threads of this process
    summary: dict[str, Any] = {
        "out": _display_path(out),
        "load": [load_start, _load()],
        "config": {
            "degradations": list(cfg.degradations),
            "datasets": list(cfg.datasets),
            "models": list(cfg.models),
            "quick": cfg.quick,
            "nordland_every": cfg.nordland_every,
            "ie_tower_every": cfg.ie_tower_every,
            "kitti_query_every": cfg.kitti_query_every,
        },
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, device {cfg.device}",
        "models": [dataclasses.asdict(m) for m in models],
        "finetuned": cfg.finetuned_info,
        "sets": [
            {
                "key": s.name,
                "title": s.title,
                "database": len(s.database),
                "queries": len(s.queries),
                "streamed": len(stream(s)),
                "ground_truth": s.ground_truth.describe(),
                "domain": domains(s),
                "reference_size": cfg.reference_sizes[s.name],
                "note": s.notes,
                "queries_with_positive": int(sum(len(p) > 0 for p in s.positives()))
                if recall_applies(s) else None,
            }
            for s in sets
        ],
        "links": links,
        "results": [r.to_dict() for r in results],
        "pair_scores": pair_scores,
        "loop_closure": {
            k: {
                "bytes_per_frame": v["bytes_per_frame"],
                "models": {
                    m: {kk: vv for kk, vv in d.items() if not kk.startswith("_")}
                    for m, d in v["models"].items()
                },
            }
            for k, v in loop.items()
        },
        "loop_retuned": _retune(loop),
        "loop_shipped": _shipped_point(),
        "gap": gap_table(
            results,
            hits,
            {s.name: np.array([len(p) > 0 for p in s.positives()]) for s in sets if recall_applies(s)},
        ),
        "operating_points": operating_points(results),
        "sequence": {"set": SEQUENCE_SET, "model": SEQUENCE_MODEL, "candidates": SEQUENCE_CANDIDATES,
                     "lengths": list(SEQUENCE_LENGTHS), "recall_at_1": sequence},
        "seconds": seconds,
        "cache": {"described": cache.described, "reused": cache.reused},
    }
    pairs: dict[str, tuple[str, str]] = {}
    figures = _figures(cfg, sets, results, preds_by, hits, loop, pairs)
    if sequence:

        figures["sequence"] = shrink_png(plot_recall_vs_sequence_length(
            {lb: {int(n): v for n, v in c.items()} for lb, c in sequence.items()},
            _figure_dir(cfg) / f"sequence_{SEQUENCE_SET}.png",
            title=f"{SEQUENCE_SET}, {SEQUENCE_MODEL}: R@1 against sequence length"))
    summary["figures"] = {k: str(v) for k, v in figures.items()}
    summary["montage_pairs"] = pairs
    paths = {"results": out / "results.json"}
    if cfg.page is not None:
        write_page(summary, Path(cfg.page), figures)
        paths["page"] = Path(cfg.page)
    summary["paths"] = {
        "results": str(paths["results"]),
        "page": str(paths.get("page", "-")),
        "figures": str(_figure_dir(cfg)),
    }
    summary["per_query_first_hit"] = {"/".join(k): v for k, v in hits.items()}
    atomic_write_text(
        paths["results"], json.dumps(summary, default=json_default, allow_nan=False, indent=1) + "\n"
    )
    return summary


def _sequence_curve(cache: _Cache, s: PlaceDataset, label: str, desc_key: str, q: np.ndarray,
                    db: np.ndarray) -> dict[str, float]:
    """R@1 of sequence matching for each of SEQUENCE_LENGTHS on one link (cached by the descriptors' key)."""
    key = _hash(desc_key, "sequence", SEQUENCE_LENGTHS, SEQUENCE_CANDIDATES)
    curve = cache.get_json(s.name, label, "sequence", key)
    if curve is None:
        scores, ids = _top_k(q, db, SEQUENCE_CANDIDATES)
        rec = sequence_recall(ids, scores, s.positives(), SEQUENCE_LENGTHS)
        curve = {str(n): float(r[1]) for n, r in rec.items()}
        cache.put_json(s.name, label, "sequence", key, curve)
    return curve


# --------------------------------------------------------------------------- loop closure


def _loop_closure(
    s: PlaceDataset,
    label: str,
    link: _Link,
    descs: dict[str, np.ndarray],
    models: list[StudyModel],
    cache: _Cache,
    into: dict[str, Any],
    *,
    hq_stream_loader: Any,
    progress: bool,
) -> None:
    """Loop-closure P/R of every model on the degraded sequence at the shipped operating point."""

    loop_gt = loop_truth(s)
    assert loop_gt is not None
    window = int(DEFAULT_EXCLUSION_WINDOW_S)  # 10 s = 10 frames at the sequence's 1 Hz
    gt = loop_gt | loop_gt.T
    vcfg = VerificationConfig()
    memo_key = _hash(set_identity(s), link.spec, dataclasses.asdict(vcfg))
    memo: dict[str, list] = cache.get_json(s.name, label, "verify", memo_key) or {}
    features: list[Any] | None = None
    frames = link.frames
    n_new = 0
    for m in models:
        d = descs[m.key]
        sim = d @ d.T
        detections = []
        for i in range(window + 1, len(d)):
            cand = sim[i, : i - window]
            top = np.argsort(-cand, kind="stable")[:DEFAULT_TOP_K]
            det = Detection(i, float(i))
            for j in top:
                key = f"{i},{int(j)}"
                if key not in memo:
                    if features is None:
                        if frames is None:  # descriptors came from the cache: re-send (deterministic)
                            frames = _send(
                                hq_stream_loader(),
                                link.spec,
                                desc=f"{s.name} {label} resend",
                                progress=progress,
                            ).frames
                        orb = OrbExtractor(vcfg)
                        features = [orb(im) for im in frames]
                    v = verify_pair(features[i], features[int(j)], vcfg)
                    memo[key] = [bool(v.verified), int(v.inliers), int(v.matches), v.reason]
                    n_new += 1
                ok, inl, nm, why = memo[key]
                det.candidates.append(
                    LoopCandidate(
                        i,
                        float(i),
                        int(j),
                        float(j),
                        float(cand[j]),
                        verified=ok,
                        inliers=inl,
                        matches=nm,
                        reason=why,
                    )
                )
            detections.append(det)
        run = SequenceRun(detections, gt, window)
        shipped = operating_stats(
            run, top_k=DEFAULT_TOP_K, min_inliers=DEFAULT_MIN_INLIERS, score_threshold=DEFAULT_SCORE_THRESHOLD
        )
        curve = pr_curve(run, top_k=DEFAULT_TOP_K, min_inliers=DEFAULT_MIN_INLIERS)
        base = loop_closure_pr(sim, loop_gt, exclude_window=window)
        into["models"][m.key] = {
            "shipped": {k: v for k, v in shipped.items() if k != "false_pairs_1based"},
            "false_pairs_1based": shipped["false_pairs_1based"],
            "verified_ap": None if curve is None else curve.average_precision,
            "verified_recall_at_precision_1": None if curve is None else curve.recall_at_100_precision,
            "descriptor_ap": base.average_precision,
            "descriptor_recall_at_precision_1": base.recall_at_100_precision,
            "_curve": curve,
            "_base": base,
            "_run": run,
        }
    if n_new:
        cache.put_json(s.name, label, "verify", memo_key, memo)


def _shipped_point() -> dict[str, Any]:
    """The loop-closure operating point the package ships (core defaults = config/localize.yaml)."""

    return {
        "exclusion_window_s": DEFAULT_EXCLUSION_WINDOW_S,
        "score_threshold": DEFAULT_SCORE_THRESHOLD,
        "top_k": DEFAULT_TOP_K,
        "min_inliers": DEFAULT_MIN_INLIERS,
    }


#: The links the shipped loop-closure point was chosen on (docs/loop_closure.md); re-tuning uses the same.
RETUNE_LINKS = ("none", "jpeg_q10", "h264_qp40")


def _retune(loop: dict[str, Any]) -> dict[str, Any]:
    """Per model, the point ``choose_operating_point`` picks on :data:`RETUNE_LINKS` (the shipped point's
    protocol), with its precision / recall on every link of the study."""

    out = {}
    models = list(dict.fromkeys(m for v in loop.values() for m in v["models"]))
    for m in models:
        runs = {lb: v["models"][m]["_run"] for lb, v in loop.items() if m in v["models"]}
        tune = {lb: r for lb, r in runs.items() if lb in RETUNE_LINKS} or runs
        op = choose_operating_point(tune)
        op["tuned_on"] = list(tune)
        op["per_condition"] = {}
        for lb, run in runs.items():
            st = operating_stats(
                run, top_k=op["top_k"], min_inliers=op["min_inliers"], score_threshold=op["score_threshold"]
            )
            op["per_condition"][lb] = {k: v for k, v in st.items() if k != "false_pairs_1based"}
        out[m] = op
    return out


# --------------------------------------------------------------------------- tables


def gap_table(
    results: Sequence[EvalResult],
    hits: dict[tuple[str, str, str], np.ndarray],
    has_positive: dict[str, np.ndarray],
    distilled: str = "loqi",
    control: str = "finetuned",
) -> list[dict[str, Any]]:
    """Per dataset x link: the control's HQ/LQ R@1, the distilled model's LQ R@1, gap and share recovered
    (with a bootstrap interval from the per-query ranks ``hits``, over the queries in ``has_positive``)."""
    by = {(r.name, r.degradation, r.model): r for r in results}
    rows = []
    for (name, link, model), r in by.items():
        if model != distilled or link == "none":
            continue
        hq, lq = by.get((name, "none", control)), by.get((name, link, control))
        if hq is None or lq is None:
            continue
        share = gap_share(hq.recalls[1], lq.recalls[1], r.recalls[1])
        ci, why = None, "" if share is not None else f"gap < {100 * MIN_GAP:.0f} points"
        keys = [(name, "none", control), (name, link, control), (name, link, distilled)]
        if share is not None and all(k in hits for k in keys) and name in has_positive:
            valid = has_positive[name]
            boot = _bootstrap_share(*(hits[k][valid] == 0 for k in keys))
            if boot is not None and boot["gap_p5"] <= 0:  # the gap itself is within the noise
                share, why = None, "gap not above noise (bootstrap 5th percentile <= 0)"
            elif boot is not None:
                ci = boot["share_ci90"]
        rows.append(
            {
                "dataset": name,
                "link": link,
                "hq_finetuned": hq.recalls[1],
                "lq_finetuned": lq.recalls[1],
                "lq_distilled": r.recalls[1],
                "gap": hq.recalls[1] - lq.recalls[1],
                "share": share,
                "ci90": ci,
                "left_out": why,
                "queries": r.n_queries,
            }
        )
    return rows


def operating_points(results: Sequence[EvalResult], keep: float = 0.9) -> list[dict[str, Any]]:
    """Per dataset x model: the cheapest link keeping ``keep`` of the full-quality R@1."""
    rows = []
    groups: dict[tuple[str, str], list[EvalResult]] = {}
    for r in results:
        groups.setdefault((r.name, r.model), []).append(r)
    for (name, model), rs in groups.items():
        full = next((r for r in rs if r.degradation == "none"), None)
        if full is None or not full.recalls.get(1):
            continue
        ok = [r for r in rs if r.bytes_per_frame and r.recalls[1] >= keep * full.recalls[1]]
        best = min(ok, key=lambda r: r.bytes_per_frame)
        rows.append(
            {
                "dataset": name,
                "model": model,
                "full_r1": full.recalls[1],
                "full_bytes": full.bytes_per_frame,
                "link": best.degradation,
                "bytes": best.bytes_per_frame,
                "r1": best.recalls[1],
            }
        )
    return rows


# --------------------------------------------------------------------------- figures

_MODEL_COLORS = {
    "imagenet": "#7f7f7f",
    "finetuned": "#1f77b4",
    "loqi": "#d62728",
    "structvpr": "#2ca02c",
    "scicevpr": "#9467bd",
}
_FAMILY_MARKERS = {"none": "*", "jpeg": "o", "res": "s", "h264": "^", "h265": "D", "kbps": "X"}


def _family(label: str) -> str:
    return next((f for f in _FAMILY_MARKERS if label.startswith(f)), "none")


def _figure_dir(cfg: StudyConfig) -> Path:
    if cfg.page is None:
        return Path(cfg.out) / "figures"
    page = Path(cfg.page)
    return page.parent / page.stem


def shrink_png(path: Path, colors: int = 96) -> Path:
    """Re-save a PNG with a palette of ``colors`` (figures for the repo stay around 50-150 kB)."""

    with Image.open(path) as im:
        small = im.convert("RGB").quantize(
            colors=colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE
        )
    small.save(path, optimize=True)
    return path


def _new_figure(w: float, h: float, dpi: int = 90):

    fig = Figure(figsize=(w, h), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=fig.dpi)
    return shrink_png(path)


def plot_bandwidth(results: Sequence[EvalResult], path: Path, *, title: str) -> Path:
    """R@1 versus bytes/frame: one colour per model, one marker per codec family, a line per family."""
    fig = _new_figure(7.2, 4.6)
    ax = fig.add_subplot()
    models = list(dict.fromkeys(r.model for r in results))
    for m in models:
        rs = [r for r in results if r.model == m and r.bytes_per_frame]
        color = _MODEL_COLORS.get(m, "k")
        for fam in _FAMILY_MARKERS:
            pts = sorted(
                (r.bytes_per_frame, 100 * r.recalls[1], r.degradation)
                for r in rs
                if _family(r.degradation) == fam
            )
            if not pts:
                continue
            x, y, _ = zip(*pts, strict=True)
            ax.plot(
                x,
                y,
                color=color,
                marker=_FAMILY_MARKERS[fam],
                ms=6 if fam != "none" else 11,
                lw=1.2,
                alpha=0.9,
                ls="-" if fam in ("jpeg", "h264", "h265", "res") else "none",
            )
    ax.set_xscale("log")
    ax.set_xlabel("bytes per frame (encoded payload; log scale)")
    ax.set_ylabel("R@1 (%)")
    ax.grid(True, which="both", alpha=0.25)
    ax.set_title(title, fontsize=10)

    handles = [Line2D([], [], color=_MODEL_COLORS.get(m, "k"), lw=2, label=m) for m in models]
    handles += [
        Line2D([], [], color="k", marker=mk, ls="none", label=f)
        for f, mk in _FAMILY_MARKERS.items()
        if any(_family(r.degradation) == f for r in results)
    ]
    ax.legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    return _save(fig, path)


def plot_recall_n(
    results: Sequence[EvalResult], path: Path, *, title: str, links: Sequence[str] = CURVE_LINKS
) -> Path:
    """Recall@N curves (N = 1, 5, 10, 20), one panel per link, one line per model."""

    labels = [TransmissionConfig.parse(x).label for x in links]
    labels = [lb for lb in labels if any(r.degradation == lb for r in results)]
    fig = _new_figure(2.4 * len(labels) + 0.6, 2.8)
    axes = fig.subplots(1, len(labels), squeeze=False, sharey=True)[0]
    for ax, lb in zip(axes, labels, strict=True):
        for r in results:
            if r.degradation != lb:
                continue
            ns = sorted(r.recalls)
            ax.plot(
                ns,
                [100 * r.recalls[n] for n in ns],
                marker="o",
                ms=3,
                color=_MODEL_COLORS.get(r.model, "k"),
                label=r.model,
            )
        ax.set_xscale("log")
        ax.set_xticks(list(RECALL_NS), [str(n) for n in RECALL_NS])
        ax.set_ylim(0, 100)
        ax.grid(True, alpha=0.25)
        ax.set_title(lb, fontsize=9)
        ax.set_xlabel("N")
    axes[0].set_ylabel("recall@N (%)")
    axes[-1].legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_loop_pr(loop: dict[str, Any], path: Path) -> Path:
    """Loop-closure PR over the score threshold, a column per model: verified (top-5, >= 25 inliers) on
    top (precision axis from 0.8), descriptor top-1 alone below; one colour per link."""

    models = list(dict.fromkeys(m for v in loop.values() for m in v["models"]))
    fig = _new_figure(2.6 * len(models) + 0.6, 5.6)
    axes = fig.subplots(2, len(models), squeeze=False, sharex=True)
    cmap = matplotlib.colormaps["viridis"]
    labels = list(loop)
    handles = []
    for col, m in enumerate(models):
        for row, key in enumerate(("_curve", "_base")):
            ax = axes[row][col]
            for i, lb in enumerate(labels):
                c: PRCurve | None = loop[lb]["models"].get(m, {}).get(key)
                if c is None:
                    continue
                color = cmap(i / max(1, len(labels) - 1))
                x, y = np.r_[0.0, c.recall], np.r_[c.precision[0], c.precision]
                (h,) = ax.plot(x, y, color=color, lw=1.1, label=lb)
                if row == 0 and col == 0:
                    handles.append(h)
            ax.set_xlim(0, 1.02)
            ax.set_ylim((0.8, 1.01) if row == 0 else (0.0, 1.02))
            ax.grid(True, alpha=0.25)
            ax.tick_params(labelsize=7)
            if row == 0:
                ax.set_title(m, fontsize=9)
            else:
                ax.set_xlabel("recall", fontsize=8)
    axes[0][0].set_ylabel("precision\nverified top-5, >= 25 inl.", fontsize=8)
    axes[1][0].set_ylabel("precision\ndescriptor top-1 only", fontsize=8)
    fig.suptitle("rtabmap_loop loop closure, score threshold swept, one curve per link", fontsize=9)
    fig.legend(handles=handles, loc="lower center", ncol=min(7, len(handles)), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.09 if len(handles) > 7 else 0.06, 1, 1))
    return _save(fig, path)


def plot_link_gallery(image: np.ndarray, specs: Sequence[str], path: Path, *, title: str) -> Path:
    """One frame as received through each link, titled with its size on the link."""

    cols = 5
    rows = math.ceil(len(specs) / cols)
    fig = _new_figure(2.2 * cols, 1.9 * rows + 0.3, dpi=80)
    axes = fig.subplots(rows, cols, squeeze=False)
    for k, ax in enumerate(axes.ravel()):
        ax.axis("off")
        if k >= len(specs):
            continue
        cfg = TransmissionConfig.parse(specs[k])
        got = Transmitter(cfg).process(image)
        ax.imshow(got.image)
        ax.set_title(f"{cfg.label}: {got.nbytes:,} B", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=fig.dpi)
    return shrink_png(path, colors=48)


def _montage(s: PlaceDataset, a: str, b: str, preds: dict, hits: dict, path: Path, n: int = 3) -> Path | None:
    """Wins (``a`` right at R@1, ``b`` wrong) and failures (``a`` wrong) at :data:`MONTAGE_LINK`."""

    label = TransmissionConfig.parse(MONTAGE_LINK).label
    if (s.name, label, a) not in hits or s.positives() is None:
        return None
    ha = hits[(s.name, label, a)]
    hb = hits.get((s.name, label, b))
    has_pos = np.array([len(p) > 0 for p in s.positives()])
    wins = np.nonzero(has_pos & (ha == 0) & ((hb != 0) if hb is not None else True))[0]
    fails = np.nonzero(has_pos & (ha != 0))[0]
    pick = (
        [(int(i), "win") for i in wins[np.linspace(0, len(wins) - 1, min(n, len(wins))).astype(int)]]
        if len(wins)
        else []
    )
    pick += (
        [(int(i), "fail") for i in fails[np.linspace(0, len(fails) - 1, min(n, len(fails))).astype(int)]]
        if len(fails)
        else []
    )
    if not pick:
        return None
    cfg = TransmissionConfig.parse(MONTAGE_LINK)
    queries, retrieved, flags, titles = [], [], [], []
    for qi, kind in pick:
        rec = s.queries[qi]
        queries.append(Transmitter(cfg).process(rec.load()).image)  # JPEG is per frame: same as in the stream
        top = [int(p) for p in preds[(s.name, label, a)][qi][:3]]
        retrieved.append([s.database[p].load() for p in top])
        flags.append([p in set(s.positives()[qi].tolist()) for p in top])
        titles.append(f"{kind}: {rec.name[:16]}")
    p = plot_match_montage(queries, retrieved, flags, path, titles=titles)
    return shrink_png(p, colors=40)


def _figures(
    cfg: StudyConfig,
    sets: list[PlaceDataset],
    results: list[EvalResult],
    preds: dict,
    hits: dict,
    loop: dict,
    pairs: dict[str, tuple[str, str]],
) -> dict[str, Path]:
    """Draw every figure; ``pairs`` receives each montage's (model shown, model compared)."""
    fdir = _figure_dir(cfg)
    fdir.mkdir(parents=True, exist_ok=True)
    figs: dict[str, Path] = {}
    for s in sets:
        rs = [r for r in results if r.name == s.name]
        if not rs:
            continue
        figs[f"bandwidth_{s.name}"] = plot_bandwidth(
            rs, fdir / f"bandwidth_{s.name}.png", title=f"{s.name}: R@1 vs bytes/frame"
        )
        figs[f"recall_{s.name}"] = plot_recall_n(
            rs, fdir / f"recall_at_n_{s.name}.png", title=f"{s.name}: recall@N"
        )
        have = {r.model for r in rs}
        a, b = ("structvpr", "imagenet") if s.name.startswith("kitti") else ("loqi", "finetuned")
        if a not in have:
            a = "loqi"
        if b not in have:
            b = "imagenet"
        m = _montage(s, a, b, preds, hits, fdir / f"montage_{s.name}.png")
        if m is not None:
            figs[f"montage_{s.name}"] = m
            pairs[s.name] = (a, b)
    if loop:
        figs["loop_pr"] = plot_loop_pr(loop, fdir / "loop_pr.png")
    tokyo = next((s for s in sets if s.name == "tokyo_pair"), None)
    if tokyo is not None:
        figs["links_gallery"] = plot_link_gallery(
            stream(tokyo)[0].load(),
            cfg.degradations,
            fdir / "links_tokyo.png",
            title="one Tokyo 24/7 query (640x480) as received through each link",
        )
    return figs


# --------------------------------------------------------------------------- the page


def _pct(v: float | None) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{100 * v:.1f}"


def _bytes(b: float | None) -> str:
    if b is None:
        return "-"
    return f"{b:,.0f}" if b >= 100 else f"{b:.0f}"


def _rel(path: Path, page: Path) -> str:
    return os.path.relpath(path, page.parent)


def render_page(summary: dict[str, Any], page: Path, figures: dict[str, Path]) -> str:
    """The generated block of the results page (Markdown)."""
    res = [EvalResult.from_dict(r) for r in summary["results"]]
    models = [m for m in summary["models"]]
    avail = [m["key"] for m in models if m["available"]]
    sets = summary["sets"]
    links = summary["links"]
    order = [lb for lb in dict.fromkeys(lb for v in links.values() for lb in v)]
    sec = summary["seconds"]
    quick = " --quick" if summary["config"]["quick"] else ""
    load = summary.get("load") or ["?", "?"]
    L: list[str] = [GEN_BEGIN, ""]
    L += [
        f"Generated by `make study` (`scripts/accuracy_study.py{quick}`) "
        f"on {summary['machine']}: {sec['total'] / 60:.1f} min wall this run, "
        f"{sec.get('cpu_evaluation', float('nan')) / 60:.1f} min CPU for the evaluation (load average "
        f"{load[0]} at the start, {load[1]} at the end: "
        "the wall time depends on what else runs); "
        f"{summary['cache']['described']} descriptor sets computed, {summary['cache']['reused']} from the "
        f"cache in `{summary['out']}/cache`; raw numbers in `{summary['out']}/results.json`.",
        "",
    ]
    L += ["## Models", "", "| key | model | input (H x W) | trained on | weights |", "|---|---|---|---|---|"]
    for m in models:
        if not m["available"]:
            L.append(f"| `{m['key']}` | {m['label']} | - | - | **{m['reason']}** |")
            continue
        size = "dataset reference size (below)" if m["weights"] is None else "checkpoint's own"
        w = "-" if m["weights"] is None else f"`{Path(m['weights']).name}` (sha256 {m['sha256'][:12]})"
        L.append(f"| `{m['key']}` | {m['label']} | {size} | {m['trained_on']} | {w} |")
    ft = summary.get("finetuned") or {}
    if ft:
        L += [
            "",
            f"`finetuned` is the LoQI recipe (`{ft.get('recipe')}`) with the triplet loss only: "
            f"{ft.get('steps')} steps, initialised from {ft.get('teacher')}, like the packaged LoQI student "
            "(same recipe, same teacher, same split, seed 0); only the distillation terms are off.",
        ]
    L += [
        "",
        "## Datasets",
        "",
        "| key | what | map | queries | ground truth | ImageNet input | domain per model |",
        "|---|---|---:|---:|---|---|---|",
    ]
    for s in sets:
        dom = "; ".join(f"{k}: {v}" for k, v in s["domain"].items() if k in avail)
        L.append(
            f"| `{s['key']}` | {s['title']}. {s['note']} | {s['database']} | {s['queries']} | "
            f"{s['ground_truth']} | {s['reference_size'][0]}x{s['reference_size'][1]} | {dom} |"
        )
    L += [
        "",
        "## Bytes per frame on the link",
        "",
        "Measured from the encoded payloads of each link (`none` and `res_*`: raw RGB bytes of what is "
        "sent). "
        "Video links send the queries as one stream in order (GOP 30, no B-frames); the budget link is "
        "H.264 rate control at 100 kbit/s for a 10 frame/s camera (1,250 bytes/frame).",
        "",
    ]
    L += ["| link | " + " | ".join(s["key"] for s in sets) + " |", "|---|" + "---:|" * len(sets)]
    for lb in order:
        L.append(
            f"| {lb} | "
            + " | ".join(_bytes(links[s["key"]].get(lb, {}).get("bytes_per_frame")) for s in sets)
            + " |"
        )
    if "links_gallery" in figures:
        L += ["", f"![links]({_rel(figures['links_gallery'], page)})"]
    L += [
        "",
        "## Recall per dataset",
        "",
        "R@1 / R@5 / R@10 in %, queries through the link against the high-quality map; the best R@1 of a row "
        "in bold. Plots: R@1 against bytes/frame (the bandwidth-accuracy curve to choose an operating point "
        "on), recall@N curves, and a montage (query as received through JPEG q10, then the top 3 "
        "retrievals, green = correct, red = wrong) of wins and failures.",
    ]
    for s in sets:
        rs = {(r.degradation, r.model): r for r in res if r.name == s["key"]}
        if not rs:
            continue
        ms = [m for m in avail if any(k[1] == m for k in rs)]
        nq = next(iter(rs.values())).n_queries
        L += [
            "",
            f"### {s['key']}: {s['title']}",
            "",
            f"{nq} queries with a positive, {s['database']} map images. "
            + "; ".join(f"`{m}`: {s['domain'].get(m, '-')}" for m in ms)
            + ".",
            "",
        ]
        L += ["| link | bytes/frame | " + " | ".join(ms) + " |", "|---|---:|" + "---|" * len(ms)]
        for lb in order:
            row = [rs.get((lb, m)) for m in ms]
            if not any(row):
                continue
            best = max((r.recalls[1] for r in row if r), default=0)
            cells = []
            for r in row:
                if r is None:
                    cells.append("-")
                    continue
                r1 = _pct(r.recalls[1])
                cells.append(
                    f"{'**' + r1 + '**' if r.recalls[1] == best else r1} / {_pct(r.recalls[5])} / "
                    f"{_pct(r.recalls[10])}"
                )
            L.append(
                f"| {lb} | {_bytes(links[s['key']][lb]['bytes_per_frame'])} | " + " | ".join(cells) + " |"
            )
        for name, cap in (
            (f"bandwidth_{s['key']}", "R@1 vs bytes/frame"),
            (f"recall_{s['key']}", "recall@N"),
        ):
            if name in figures:
                L += ["", f"![{cap}]({_rel(figures[name], page)})"]
        mkey = f"montage_{s['key']}"
        if mkey in figures and s["key"] in summary.get("montage_pairs", {}):
            a, b = summary["montage_pairs"][s["key"]]
            L += [
                "",
                f"Montage, `{a}` at JPEG q10: 'win' rows are queries `{a}` gets right at R@1 and `{b}` "
                f"does not; 'fail' rows are queries `{a}` gets wrong.",
                "",
                f"![montage {a} vs {b}]({_rel(figures[mkey], page)})",
            ]
    pairs = summary.get("pair_scores") or {}
    for key, per in pairs.items():
        L += [
            "",
            f"### {key}: similarity only",
            "",
            "One pair cannot give a recall. Cosine similarity of the received query to its true match "
            "(same model, high-quality match):",
            "",
            "| link | " + " | ".join(per) + " |",
            "|---|" + "---:|" * len(per),
        ]
        for lb in order:
            if all(lb in v for v in per.values()):
                L.append(f"| {lb} | " + " | ".join(f"{per[m][lb]:.3f}" for m in per) + " |")
    L += [
        "",
        "## Share of the quality gap that distillation recovers",
        "",
        "share = (R@1_LQ(distilled) - R@1_LQ(finetuned)) / (R@1_HQ(finetuned) - R@1_LQ(finetuned))",
        "",
        "with `finetuned` the no-distillation control (same recipe, initialisation, data and steps as the "
        "distilled `loqi`), HQ = the `none` link and LQ = the link of the row. 1 closes the whole gap, 0 "
        "recovers nothing, < 0 is worse than fine-tuning, > 1 is better than the fine-tuned model at full "
        f"quality. Only rows with a meaningful gap: at least {100 * MIN_GAP:.0f} points, and above the noise "
        "(the 5th percentile of the gap over 2,000 paired bootstrap resamples of the queries is > 0); "
        "90 % interval of the share from the same resamples. "
        "StructVPR has no packaged no-distillation control of its own recipe, so it is not in this table "
        "(its own comparison is in docs/structvpr.md).",
        "",
        "| dataset | link | finetuned R@1 HQ | finetuned R@1 LQ | loqi R@1 LQ | gap (pts) | recovered "
        "| 90 % interval |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    shown = 0
    for g in summary["gap"]:
        if g["share"] is None:
            continue
        shown += 1
        ci = "-" if not g["ci90"] else f"{100 * g['ci90'][0]:.0f} % .. {100 * g['ci90'][1]:.0f} %"
        L.append(
            f"| {g['dataset']} | {g['link']} | {_pct(g['hq_finetuned'])} | {_pct(g['lq_finetuned'])} | "
            f"{_pct(g['lq_distilled'])} | {100 * g['gap']:.1f} | {100 * g['share']:.0f} % | {ci} |"
        )
    small = [g for g in summary["gap"] if g["share"] is None]
    if small:
        L += [
            "",
            "Left out, gap in points (the fine-tuned model's full-quality minus link R@1): "
            + "; ".join(
                f"{why}: "
                + ", ".join(
                    f"{g['dataset']}/{g['link']} ({100 * g['gap']:+.1f})"
                    for g in small
                    if g["left_out"] == why
                )
                for why in dict.fromkeys(g["left_out"] for g in small)
            )
            + ".",
        ]
    pooled = {}
    for g in summary["gap"]:
        if g["share"] is not None:
            num, den = pooled.get(g["dataset"], (0.0, 0.0))
            pooled[g["dataset"]] = (num + g["lq_distilled"] - g["lq_finetuned"], den + g["gap"])
    if pooled:
        L += [
            "",
            "Pooled over the rows above (sum of recovered points / sum of gaps): "
            + ", ".join(f"{k} {100 * n / d:.0f} %" for k, (n, d) in pooled.items())
            + ".",
        ]
    L += [
        "",
        "## Operating points",
        "",
        "The cheapest link that keeps at least 90 % of the model's own full-quality R@1:",
        "",
        "| dataset | model | R@1 full quality | bytes/frame full | cheapest link >= 90 % | bytes/frame "
        "| R@1 there |",
        "|---|---|---:|---:|---|---:|---:|",
    ]
    for o in summary["operating_points"]:
        L.append(
            f"| {o['dataset']} | {o['model']} | {_pct(o['full_r1'])} | {_bytes(o['full_bytes'])} | "
            f"{o['link']} | "
            f"{_bytes(o['bytes'])} | {_pct(o['r1'])} |"
        )
    seq = summary.get("sequence") or {}
    if seq.get("recall_at_1"):
        lengths = [str(n) for n in seq["lengths"]]
        L += [
            "",
            "## Sequence matching: R@1 against sequence length",
            "",
            f"`{seq['model']}` on `{seq['set']}`: the stream's top-{seq['candidates']} candidates through "
            "the localizer's sequence matcher (`core.sequence`, SeqSLAM-style lines with velocities 0.8-1.25 "
            "places per frame; [sequence.md](sequence.md)); L = 1 is the single frame.",
            "",
            "| link | " + " | ".join(f"L = {n}" for n in lengths) + " | L = " + lengths[-1] + " / single |",
            "|---|" + "---:|" * (len(lengths) + 1),
        ]
        for lb, c in seq["recall_at_1"].items():
            ratio = c[lengths[-1]] / c["1"] if c.get("1") else float("nan")
            L.append(f"| {lb} | " + " | ".join(_pct(c[n]) for n in lengths) + f" | {ratio:.1f}x |")
        if "sequence" in figures:
            L += ["", f"![R@1 against sequence length]({_rel(figures['sequence'], page)})"]
    lc = summary.get("loop_closure") or {}
    if lc:
        ms = list(dict.fromkeys(m for v in lc.values() for m in v["models"]))
        sp = summary["loop_shipped"]
        L += [
            "",
            "## Loop closure on rtabmap_loop",
            "",
            "The whole 84-frame sequence through each link; each frame's candidates are earlier frames "
            f"more than {sp['exclusion_window_s']:g} frames ({sp['exclusion_window_s']:g} s at 1 Hz) back. "
            "Shipped operating point (`core.loop_closure` defaults = config/localize.yaml): exclusion "
            f"{sp['exclusion_window_s']:g} s, score >= {sp['score_threshold']:g}, top {sp['top_k']}, "
            f"geometric verification (ORB + RANSAC) with >= {sp['min_inliers']} inliers. P / R at that point "
            "(P = 1.00 when nothing is accepted). The cosine scale is model-specific, so every model is "
            "shown at the shipped values and at a point re-tuned for it by the same rule (below).",
            "",
            "| link | bytes/frame | "
            + " | ".join(f"{m} shipped P / R" for m in ms)
            + " | "
            + " | ".join(f"{m} re-tuned P / R" for m in ms)
            + " |",
            "|---|---:|" + "---|" * (2 * len(ms)),
        ]
        tuned = summary.get("loop_retuned") or {}
        for lb, v in lc.items():
            shipped, retuned = [], []
            for m in ms:
                d = v["models"].get(m)
                shipped.append(
                    "-" if d is None else f"{d['shipped']['precision']:.2f} / {d['shipped']['recall']:.2f}"
                )
                st = tuned.get(m, {}).get("per_condition", {}).get(lb)
                retuned.append("-" if st is None else f"{st['precision']:.2f} / {st['recall']:.2f}")
            L.append(f"| {lb} | {_bytes(v['bytes_per_frame'])} | " + " | ".join(shipped + retuned) + " |")
        if tuned:
            L += [
                "",
                "Re-tuned points, one per model, by the rule that chose the shipped one "
                "(`loop_closure.choose_operating_point` on the links none, jpeg_q10 and h264_qp40: the best "
                "worst-case recall at precision 1, with `min_inliers` >= 1.25 x the inliers of the worst "
                "clearly false pair):",
                "",
                "| model | score_threshold | top_k | min_inliers |",
                "|---|---:|---:|---:|",
            ]
            for m, op in tuned.items():
                L.append(f"| {m} | {op['score_threshold']:.4f} | {op['top_k']} | {op['min_inliers']} |")
        L += [
            "",
            "Threshold-free: the best recall at precision 1 over all score thresholds, verified (top 5, "
            ">= 25 inliers) / descriptor top-1 alone:",
            "",
            "| link | " + " | ".join(ms) + " |",
            "|---|" + "---|" * len(ms),
        ]
        for lb, v in lc.items():
            cells = []
            for m in ms:
                d = v["models"].get(m)
                vr = None if d is None else d["verified_recall_at_precision_1"]
                cells.append(
                    "-"
                    if d is None
                    else f"{'-' if vr is None else f'{vr:.2f}'} / {d['descriptor_recall_at_precision_1']:.2f}"
                )
            L.append(f"| {lb} | " + " | ".join(cells) + " |")
        if "loop_pr" in figures:
            L += ["", f"![loop closure PR]({_rel(figures['loop_pr'], page)})"]
    L += ["", "Per-stage time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in sec.items()) + ".", "", GEN_END]
    return "\n".join(L) + "\n"


PAGE_HEAD = """# Results: accuracy under low-quality links

What each model finds when the queries arrive over a thin link. Regenerate with `make study`
(or `python scripts/accuracy_study.py`); everything between the generated markers below is rewritten,
the text outside them is kept.

"""


def write_page(summary: dict[str, Any], page: Path, figures: dict[str, Path]) -> Path:
    """Write (or update the generated block of) the results page."""
    block = render_page(summary, page, figures)
    if page.is_file():
        text = page.read_text(encoding="utf-8")
        if GEN_BEGIN in text and GEN_END in text:
            head, rest = text.split(GEN_BEGIN, 1)
            tail = rest.split(GEN_END, 1)[1]
            atomic_write_text(page, head + block.rstrip("\n") + tail)
            return page
    atomic_write_text(page, PAGE_HEAD + block)
    return page
