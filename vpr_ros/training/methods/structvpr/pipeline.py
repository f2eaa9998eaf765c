"""The StructVPR pipeline: segment -> SLME -> Stage I (both branches) -> partition -> Stage II -> export.

    vpr-ros train --config training/structvpr_kitti.yaml [--export student.pt]

1. **Segment** every training (and evaluation) image once with the configured segmenter; label maps are
   cached as PNGs keyed by image path and segmenter id (:class:`.segmentation.LabelCache`).
2. **SLME**: class maps -> weighted one-hot group maps at the student's input size (:mod:`.slme`).
3. **Stage I**: the rgb-branch (``structvpr_mobilenetv2``, ImageNet init) on RGB tuples and the seg-branch
   (``structvpr_segbranch``, random init) on the SLME maps of the same tuples, each with the triplet loss.
4. **Partition**: ranks x (seg) and y (rgb) of every training pair's positive; groups D1-D4 and the pair
   weights of the chosen weighting (:mod:`.partition`, :mod:`.weighted_kd`).
5. **Stage II**: the student starts from ImageNet and learns from triplet + phi-weighted distillation of
   the frozen seg-branch through a linear T (Eq. 6, :class:`.weighted_kd.StructVPRDistill`), on tuples
   drawn pair by pair so that every group D1-D4 is trained on (:class:`StructTuples`).
6. **Export**: the student alone as deployed weights (a plain ``structvpr_mobilenetv2``).

Data, tuples, degradation, hard mining, optimiser, learning-rate schedule, the training loop and
checkpoints are the training engine's: each stage is a :class:`~vpr_ros.training.engine.PlaceTrainer`
(:class:`RgbBranchStage`, :class:`SegBranchStage`, :class:`DistillStage`) run on a :class:`StageRecipe`
(the recipe's shared sections with the stage's schedule), overriding only the hooks that are StructVPR's
(models, tuples, objective). Places come from the engine's sources (``places.kind: engine`` with a ``data``
section: nordland / folder / bags, split by place) or from KITTI odometry sequences with poses
(``places.kind: kitti``: one sequence to train, another to test). A stage whose run directory holds
``summary.json`` is reused; one killed midway resumes from its ``last.pt`` (every ``ckpt_every`` steps).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vpr_ros.core.errors import ConfigError, TransmissionError
from vpr_ros.core.fileio import atomic_path, atomic_write_text
from vpr_ros.core.images import save_image
from vpr_ros.core.models import create_model, model_from_checkpoint, read_checkpoint
from vpr_ros.core.models.registry import Preprocess, VprModel
from vpr_ros.core.transmission import TransmissionConfig, degrade_image, received_image
from vpr_ros.data.places import GroundTruth, ImageRecord, PlaceDataset, load_kitti
from vpr_ros.training.config import (
    DataConfig,
    DegradationConfig,
    OptimConfig,
    RunConfig,
    ScheduleConfig,
    validate_data,
    validate_degradation,
    validate_optim,
)
from vpr_ros.training.data import (
    Degrader,
    TupleDataset,
    build_places,
    degrade_queries,
    sample_rng,
)
from vpr_ros.training.engine import Method, PlaceTrainer, TrainResult, run_trainer
from vpr_ros.training.evaluate import describe, recall_on_places
from vpr_ros.training.export import export_deployed
from vpr_ros.training.methods.structvpr.partition import (
    GROUPS,
    MODES,
    RANKS,
    Pairs,
    group_of,
    group_shares,
    rank_pairs,
)
from vpr_ros.training.methods.structvpr.seg_branch import SegBranch  # noqa: F401  (registers structvpr_segbranch)
from vpr_ros.training.methods.structvpr.segmentation import (
    ESPNetv2Segmenter,
    LabelCache,
    LabelFolderSegmenter,
    Segmenter,
    read_label_map,
)
from vpr_ros.training.methods.structvpr.segmentation import segment_files as _segment_files
from vpr_ros.training.methods.structvpr.slme import SLMEConfig, SLMEncoder
from vpr_ros.training.methods.structvpr.weighted_kd import (
    WEIGHTINGS,
    PairWeights,
    StructVPRDistill,
    WeightingConfig,
    init_projection,
    pair_weights,
    summarize_weights,
    triplet_eq3,
)

log = logging.getLogger("vpr_ros.training.methods.structvpr")

# --------------------------------------------------------------------------- configuration


@dataclass
class PlacesConfig:
    """``kitti``: train on ``train_sequence`` (every frame a query and a database image; positives within
    ``pos_radius_m`` but more than ``exclude_frames`` frames away, negatives beyond ``neg_radius_m``); test
    on ``test_sequence`` with database frames ``i % test_step == 0`` and queries ``i % test_step`` in
    ``test_offsets`` (positives within ``test_radius_m``). ``engine``: the ``data`` section's source, split
    by place (``data.split``); the validation side is the test."""

    kind: str = "kitti"
    root: str = "${VPR_ROS_SHARED:-../shared}/data/kitti_first300"
    train_sequence: str = "05"
    test_sequence: str = "00"
    every: int = 1
    pos_radius_m: float = 6.0
    neg_radius_m: float = 20.0
    exclude_frames: int = 2
    test_step: int = 10
    test_offsets: list[int] = field(default_factory=lambda: [3, 4, 5, 6, 7])
    test_radius_m: float = 6.0
    max_train_queries: int | None = None


@dataclass
class SegmentationConfig:
    """``espnetv2`` (checkpoint ``weights``, run ``width`` px wide) or ``labels`` (PNG maps in ``labels_dir``,
    named like the images relative to ``image_root``, or by stem)."""

    source: str = "espnetv2"
    weights: str = "${VPR_ROS_SHARED:-../shared}/weights/espnetv2_s_2.0_city_1024x512.pth"
    width: int = 768
    labels_dir: str | None = None
    image_root: str | None = None
    cache_dir: str = ".cache/structvpr/labels"


@dataclass
class SegBranchConfig:
    channels: list[int] = field(default_factory=lambda: [16, 32, 96, 128, 256])
    blocks: list[int] = field(default_factory=lambda: [1, 2, 2, 2, 1])
    expand: int = 4


@dataclass
class StageConfig:
    steps: int = 100
    lr: float = 1e-4
    batch_size: int = 4
    warmup_steps: int = 0
    scheduler: str = "cosine"


STUDENT_INITS = ("imagenet", "rgb-branch")
T_INITS = ("random", "ridge")
SAMPLINGS = ("pairs", "hardest-positive")


@dataclass
class Stage2Config(StageConfig):
    """Stage II: ``init`` of the student (``imagenet``, the paper's, or ``rgb-branch``: the Stage-I
    rgb-branch), ``t_init`` of T (``random``, the paper's, or ``ridge``: least squares from the starting
    student onto the seg-branch), ``kd_weight`` lambda of ``L = L_vpr + lambda * sum L_kd`` (1: Eq. 6),
    ``sampling`` of the tuples (:data:`SAMPLINGS`: ``pairs``, every (q, p) pair of the partition once per
    epoch, or ``hardest-positive``, the engine's one tuple per query)."""

    kd_weight: float = 1.0
    init: str = "imagenet"
    t_init: str = "random"
    sampling: str = "pairs"
    weighting: WeightingConfig = field(default_factory=WeightingConfig)


@dataclass
class StructVPRConfig:
    places: PlacesConfig = field(default_factory=PlacesConfig)
    data: DataConfig = field(
        default_factory=lambda: DataConfig(root="-", negatives=4, mining="hard", mining_pool=32)
    )
    # StructVPR trains on clean images; ["none", "jpeg:10"] (query as received through JPEG q10 half the
    # time) is the jpeg-train option
    degradation: DegradationConfig = field(default_factory=lambda: DegradationConfig(["none"], "query"))
    input_size: list[int] = field(default_factory=lambda: [480, 640])  # the paper's 640x480 (H, W)
    segmentation: SegmentationConfig = field(default_factory=SegmentationConfig)
    slme: SLMEConfig = field(default_factory=SLMEConfig)
    seg_branch: SegBranchConfig = field(default_factory=SegBranchConfig)
    rgb_stage1: StageConfig = field(default_factory=StageConfig)
    seg_stage1: StageConfig = field(default_factory=lambda: StageConfig(steps=100, lr=1e-3))
    stage2: Stage2Config = field(default_factory=Stage2Config)
    margin: float = 0.1
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval_degradations: list[str] = field(default_factory=lambda: ["none", "jpeg:10"])
    dir: str = "runs/structvpr"
    seed: int = 0
    threads: int = 1
    log_every: int = 10
    ckpt_every: int = 50  # steps between a stage's checkpoints (a killed stage resumes from the last)
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class StageRecipe:
    """What one stage runs on the engine (:meth:`StructVPR.stage_recipe`): the recipe's tuples
    (``data``), degradation and optimiser (at the stage's learning rate), the stage's schedule, and a run
    in ``DIR/<stage>`` on the CPU."""

    data: DataConfig
    degradation: DegradationConfig
    optim: OptimConfig
    schedule: ScheduleConfig
    run: RunConfig


def validate_structvpr(cfg: StructVPRConfig) -> StructVPRConfig:
    """Range checks of a StructVPR recipe (ConfigError naming the key)."""
    p, s, w = cfg.places, cfg.segmentation, cfg.stage2.weighting
    checks = [
        (p.kind in ("kitti", "engine"), "places.kind", f"{p.kind!r} is not kitti or engine"),
        (
            p.pos_radius_m > 0 and p.neg_radius_m >= p.pos_radius_m,
            "places.neg_radius_m",
            "need 0 < pos_radius_m <= neg_radius_m",
        ),
        (
            p.test_step >= 2 and all(0 < o < p.test_step for o in p.test_offsets),
            "places.test_offsets",
            f"offsets must lie in 1..test_step-1, got {p.test_offsets}",
        ),
        (
            s.source in ("espnetv2", "labels"),
            "segmentation.source",
            f"{s.source!r} is not espnetv2 or labels",
        ),
        (
            s.source != "labels" or bool(s.labels_dir),
            "segmentation.labels_dir",
            "required for source 'labels'",
        ),
        (
            len(cfg.input_size) == 2 and min(cfg.input_size) >= 32,
            "input_size",
            f"need [H, W] >= 32, got {cfg.input_size}",
        ),
        (cfg.margin > 0, "margin", f"must be > 0, got {cfg.margin}"),
        (cfg.stage2.kd_weight >= 0, "stage2.kd_weight", "must be >= 0"),
        (
            cfg.stage2.weighting.n_t >= 1 and cfg.stage2.weighting.n_m >= 1,
            "stage2.weighting",
            "n_t, n_m >= 1",
        ),
        (
            cfg.stage2.init in STUDENT_INITS,
            "stage2.init",
            f"{cfg.stage2.init!r} is not one of {STUDENT_INITS}",
        ),
        (cfg.stage2.t_init in T_INITS, "stage2.t_init", f"{cfg.stage2.t_init!r} is not one of {T_INITS}"),
        (
            cfg.stage2.sampling in SAMPLINGS,
            "stage2.sampling",
            f"{cfg.stage2.sampling!r} is not one of {SAMPLINGS}",
        ),
        (w.partition in MODES, "stage2.weighting.partition", f"{w.partition!r} is not one of {MODES}"),
        (
            w.weighting in WEIGHTINGS,
            "stage2.weighting.weighting",
            f"{w.weighting!r} is not one of {WEIGHTINGS}",
        ),
        (w.rank in RANKS, "stage2.weighting.rank", f"{w.rank!r} is not one of {RANKS}"),
        (cfg.threads >= 1, "threads", "must be >= 1"),
    ]
    for stage in ("rgb_stage1", "seg_stage1", "stage2"):
        st = getattr(cfg, stage)
        checks += [
            (st.steps >= 1 and st.batch_size >= 1 and st.lr > 0, stage, "steps, batch_size >= 1 and lr > 0"),
            (st.scheduler in ("constant", "cosine"), f"{stage}.scheduler", "constant or cosine"),
        ]
    for ok, where, text in checks:
        if not ok:
            raise ConfigError(f"{where}: {text}")
    validate_data(cfg.data)
    validate_degradation(cfg.degradation)
    for i, spec in enumerate(cfg.eval_degradations):
        try:
            TransmissionConfig.parse(spec)
        except TransmissionError as exc:
            raise ConfigError(f"eval_degradations[{i}]: {exc}") from None
    validate_optim(cfg.optim)
    return cfg


# --------------------------------------------------------------------------- places


def kitti_train_places(cfg: PlacesConfig) -> PlaceDataset:
    """One KITTI sequence as queries and database; frames within ``exclude_frames`` never pair."""
    recs = load_kitti(cfg.root, cfg.train_sequence).database[:: cfg.every]
    recs = [dataclasses.replace(r, stamp=r.frame_index / 10.0) for r in recs]  # KITTI runs at ~10 Hz
    gap = (cfg.exclude_frames + 0.5) / 10.0
    gt = GroundTruth("distance", radius_m=cfg.pos_radius_m, negatives_beyond=cfg.neg_radius_m,
                     min_time_gap_s=gap)
    places = PlaceDataset(f"kitti{cfg.train_sequence}/train", recs, recs, gt)
    return places.with_positive_queries(cfg.max_train_queries)


def kitti_test_places(cfg: PlacesConfig) -> PlaceDataset:
    """Database every ``test_step``-th frame, queries at ``test_offsets`` between them."""
    recs = load_kitti(cfg.root, cfg.test_sequence).database
    db = [r for r in recs if r.frame_index % cfg.test_step == 0]
    qs = [r for r in recs if r.frame_index % cfg.test_step in cfg.test_offsets]
    gt = GroundTruth("distance", radius_m=cfg.test_radius_m)
    return PlaceDataset(f"kitti{cfg.test_sequence}/test", db, qs, gt).with_positive_queries()


def build_structvpr_places(cfg: StructVPRConfig) -> tuple[PlaceDataset, PlaceDataset]:
    """(train, test) places."""
    if cfg.places.kind == "kitti":
        return kitti_train_places(cfg.places), kitti_test_places(cfg.places)
    train, val = build_places(cfg.data).split_by_place(cfg.data.split)
    return train.with_positive_queries(cfg.data.max_train_queries), val.with_positive_queries(
        cfg.data.max_val_queries
    )


# --------------------------------------------------------------------------- segmentation and SLME


def make_segmenter(cfg: SegmentationConfig) -> Segmenter:
    if cfg.source == "labels":
        return LabelFolderSegmenter(cfg.labels_dir, image_root=cfg.image_root)  # type: ignore[arg-type]
    return ESPNetv2Segmenter(cfg.weights, width=cfg.width)


class SLMEBank:
    """SLME maps of images by path: group-index maps (int8) in memory, expanded to tensors on demand."""

    def __init__(self, encoder: SLMEncoder, size: tuple[int, int]) -> None:
        self.encoder, self.size = encoder, size
        self.groups: dict[str, np.ndarray] = {}
        self.weights = torch.from_numpy(encoder.weights)

    @staticmethod
    def key(path: str | Path) -> str:
        return str(Path(path).resolve())

    def add(self, image_path: str | Path, label_file: str | Path) -> None:
        g = self.encoder.group_map(read_label_map(label_file), self.size)
        self.groups[self.key(image_path)] = g.astype(np.int8)

    def tensor(self, paths: Sequence[str | Path]) -> torch.Tensor:
        """(N, C, h, w) weighted one-hot maps."""
        g = torch.from_numpy(np.stack([self.groups[self.key(p)] for p in paths]).astype(np.int64))
        onehot = g[:, None] == torch.arange(self.encoder.channels)[None, :, None, None]
        return onehot.float() * self.weights[None, :, None, None]


def segment_into(
    bank: SLMEBank,
    paths: Sequence[str | Path],
    segmenter: Segmenter,
    cache: LabelCache,
    progress: bool = True,
) -> None:
    """Segment (or read from the cache) every image not yet in the bank."""
    todo = sorted({str(p) for p in paths if SLMEBank.key(p) not in bank.groups})
    if todo:
        for p, f in zip(todo, _segment_files(todo, segmenter, cache, progress=progress), strict=True):
            bank.add(p, f)


def received_files(records: Sequence[ImageRecord], spec: str, folder: Path) -> list[Path]:
    """Query images as received through ``spec`` (e.g. JPEG q10), written once as files so that they can
    be segmented and cached like any image (the seg-branch sees what the link delivers)."""
    cfg = TransmissionConfig.parse(spec)
    out = []
    for r in records:
        target = folder / cfg.label / f"{Path(r.path).parent.parent.name}_{Path(r.path).stem}.png"
        if not target.is_file() or target.stat().st_size == 0:  # empty: left by a failed write elsewhere
            save_image(target, degrade_image(r.load(), cfg).image)  # atomic and checked (OutputError)
        out.append(target)
    return out


# --------------------------------------------------------------------------- tuples


class StructTuples(TupleDataset):
    """The engine's tuples plus what StructVPR needs: ``rgb`` (student input, degraded as configured),
    ``slme`` (SLME maps of the same images, from the high-quality frames), ``weight`` (phi of (q, p)) and
    ``group`` (0..3 for D1..D4 of (q, p); -1 for a pair not in ``pairs`` or without a partition).

    With ``pairs`` and ``sampling="pairs"`` (Stage II's default) an item is one (query, positive) pair of
    the partition, every pair once per epoch, so that the tuples cover D1-D4 in the partition's shares
    (the paper's "sample" is a pair); ``hardest-positive`` keeps the engine's items (one per query, its
    most similar positive by the current model), which leaves out the pairs the student ranks badly (D1).
    Negatives are the engine's either way (hardest of ``pool`` random candidates)."""

    def __init__(
        self,
        places: PlaceDataset,
        bank: SLMEBank | None,
        *,
        rgb: bool = True,
        weights: Callable[[int, int], float] | None = None,
        pairs: Pairs | None = None,
        sampling: str = "pairs",
        n_t: int = 10,
        **tuple_args: Any,
    ) -> None:
        super().__init__(places, **tuple_args)
        if sampling not in SAMPLINGS:
            raise ConfigError(f"stage2.sampling: {sampling!r} is not one of {SAMPLINGS}")
        self.bank, self.rgb, self.weights = bank, rgb, weights
        self.pairs: Pairs | None = None
        self.group_table: dict[tuple[int, int], int] = {}
        if pairs is not None:
            usable = np.isin(pairs.q, self.index)  # queries with a positive and enough negatives
            groups = group_of(pairs.x, pairs.y, n_t)
            self.group_table = {
                (int(q), int(p)): int(g) for q, p, g in zip(pairs.q, pairs.p, groups, strict=True)
            }
            if sampling == "pairs":
                self.pairs = Pairs(pairs.q[usable], pairs.p[usable], pairs.x[usable], pairs.y[usable])

    def __len__(self) -> int:
        return len(self.pairs) if self.pairs is not None else super().__len__()

    def tuple_ids(self, k: int) -> tuple[int, int, np.ndarray, np.random.Generator]:
        if self.pairs is None:
            return super().tuple_ids(k)
        rng = sample_rng(self.seed, self.epoch, k)
        qi = int(self.pairs.q[k])
        return qi, int(self.pairs.p[k]), self._negatives(qi, rng), rng

    def __getitem__(self, k: int) -> dict[str, Any]:
        qi, p, negs, _ = self.tuple_ids(k)
        out: dict[str, Any] = {
            "index": k,
            "weight": float(self.weights(qi, p)) if self.weights else 1.0,
            "group": self.group_table.get((qi, p), -1),
        }
        if self.rgb:
            out["rgb"] = super().__getitem__(k)["lq"]
        if self.bank is not None:
            db = self.places.database
            recs = [self.places.queries[qi], db[p], *(db[n] for n in negs)]
            out["slme"] = self.bank.tensor([r.path for r in recs])
        return out


# --------------------------------------------------------------------------- the stages, on the engine's loop


class TripletObjective(nn.Module):
    """Stage I: the triplet loss of one branch's descriptors of (B, T, ...) tuples (query, positive,
    negatives...)."""

    def __init__(self, model: VprModel, margin: float) -> None:
        super().__init__()
        self.model, self.margin = model, float(margin)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        d = self.model(x.flatten(0, 1)).view(*x.shape[:2], -1)
        loss = triplet_eq3(d[:, 0], d[:, 1], d[:, 2:], self.margin).mean()
        return {"loss": loss, "triplet": loss}


class StageTrainer(PlaceTrainer):
    """One StructVPR stage on the engine's :class:`~vpr_ros.training.engine.PlaceTrainer` (loop,
    ``train.csv``, atomic self-describing checkpoints, mid-stage resume, hard-mining refresh) with a
    :class:`StageRecipe` (:meth:`StructVPR.stage_recipe`); places, SLME maps and the partition come from
    the :class:`StructVPR` run. No validation during a stage: :meth:`StructVPR.evaluate` tests afterwards."""

    method = "structvpr"
    loss_terms = ("loss", "triplet")

    def __init__(self, sv: StructVPR, name: str, stage: StageConfig, *, resume: bool = False) -> None:
        self.sv, self.name = sv, name
        super().__init__(sv.stage_recipe(name, stage), resume=resume)

    def build_places(self) -> tuple[PlaceDataset, PlaceDataset]:
        return self.sv.train_places, self.sv.test_places

    def val_columns(self) -> list[str]:
        return []

    def checkpoint_meta(self) -> dict[str, Any]:
        return {**super().checkpoint_meta(), "stage": self.name}

    def checkpoint_extra(self) -> dict[str, Any]:
        return {**super().checkpoint_extra(), "structvpr_config": self.sv.cfg.to_dict()}


class TripletStage(StageTrainer):
    """A Stage I branch: the triplet loss on one input of the tuples (``input_key``: rgb or slme)."""

    input_key = "rgb"

    def build_dataset(self) -> StructTuples:
        rgb = self.input_key == "rgb"
        return self.sv.tuples(self.student, rgb=rgb, slme=not rgb)

    def build_objective(self) -> nn.Module:
        return TripletObjective(self.student, self.sv.cfg.margin)

    def compute_loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return self.model(batch[self.input_key].to(self.dist.device))


class RgbBranchStage(TripletStage):
    """Stage I, rgb-branch: ImageNet MobileNetV2 (the student's architecture) with the triplet loss on
    RGB tuples whose query is degraded like the student's deployment input."""

    def build_models(self) -> tuple[VprModel, None]:
        return self.sv.new_rgb(), None


class SegBranchStage(TripletStage):
    """Stage I, seg-branch: trained from scratch with the triplet loss on the SLME maps of the same
    tuples (maps of the high-quality frames); its hard negatives come from its own descriptors."""

    input_key = "slme"

    def build_models(self) -> tuple[VprModel, None]:
        return self.sv.new_seg(), None

    def refresh_cache(self) -> None:
        p, bank = self.train_places, self.dataset.bank
        q = describe_slme(self.student, bank, [r.path for r in p.queries])
        db = q if p.database is p.queries else describe_slme(self.student, bank, [r.path for r in p.database])
        self.dataset.set_cache(q, db)

    def checkpoint_meta(self) -> dict[str, Any]:
        return {
            **super().checkpoint_meta(),
            "degradation": None,  # the seg-branch sees SLME maps of the high-quality frames
            "segmenter": self.sv.segmenter.id,
            "slme_groups": list(self.sv.cfg.slme.groups),
        }


class DistillStage(StageTrainer):
    """Stage II: the student (ImageNet, or the Stage-I rgb-branch with ``stage2.init: rgb-branch``)
    minimises Eq. 6, ``L_vpr + sum over {q, p, n} of phi * ||x^S - T(x^D)||^2``, against the frozen
    seg-branch (:class:`~.weighted_kd.StructVPRDistill`); T is learnt with the student from PyTorch's
    initialisation (``stage2.t_init: ridge``: from :func:`~.weighted_kd.init_projection`)."""

    loss_terms = ("loss", "triplet", "kd")

    def __init__(
        self,
        sv: StructVPR,
        name: str,
        stage: Stage2Config,
        *,
        weighting: WeightingConfig,
        kd_weight: float,
        resume: bool = False,
    ) -> None:
        self.wcfg, self.lam, self.s2 = weighting, kd_weight, stage
        self.pairs = sv.partition(weighting.rank)
        self.weights = pair_weights(self.pairs, weighting)
        super().__init__(sv, name, stage, resume=resume)

    def build_models(self) -> tuple[VprModel, VprModel]:
        root = self.sv.root
        init = self.s2.init
        student = load_trained(root / "stage1_rgb").train() if init == "rgb-branch" else self.sv.new_rgb()
        return student, load_trained(root / "stage1_seg")

    def build_dataset(self) -> StructTuples:
        weights = PairWeights(self.pairs, self.weights)
        self.group_hist: dict[int, list[int]] = {}  # epoch -> tuples drawn from D1..D4 (and outside: 5th)
        return self.sv.tuples(
            self.student,
            rgb=True,
            slme=self.lam > 0,
            weights=weights,
            pairs=self.pairs,
            sampling=self.s2.sampling,
        )

    def build_objective(self) -> StructVPRDistill:
        distill = StructVPRDistill(self.student, self.teacher, kd_weight=self.lam, margin=self.sv.cfg.margin)
        if self.lam > 0 and self.s2.t_init == "ridge" and not self.resuming:
            db = self.train_places.database
            fit_mse = init_projection(
                distill.proj,
                describe(self.student, [self.dataset.cache.get(r) for r in db]),
                describe_slme(self.teacher, self.dataset.bank, [r.path for r in db]),
            )
            self.student.train()
            log.info("%s: T initialised by least squares (residual %.3f)", self.name, fit_mse)
        return distill

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in [*self.student.parameters(), *self.objective.proj.parameters()] if p.requires_grad]

    def compute_loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        epoch = self.step // self.steps_per_epoch
        counts = np.bincount(np.asarray(batch["group"]) % 5, minlength=5)  # -1 (no group) -> 4
        hist = self.group_hist.setdefault(epoch, [0] * 5)
        self.group_hist[epoch] = [a + int(b) for a, b in zip(hist, counts, strict=True)]
        if (self.step + 1) % self.steps_per_epoch == 0 or self.step + 1 == self.total_steps:
            h = self.group_hist[epoch]
            log.info(
                "%s epoch %d: tuples per group %s",
                self.name,
                epoch,
                "  ".join(f"{g} {c}" for g, c in zip([*GROUPS, "none"], h, strict=True)),
            )
        dev = self.dist.device
        rgb = batch["rgb"].to(dev)
        slme = batch["slme"].to(dev) if "slme" in batch else rgb[:, :, :1]  # no KD: never read
        return self.model(rgb, slme, batch["weight"].to(dev))

    def checkpoint_meta(self) -> dict[str, Any]:
        if self.lam == 0:  # the no-distillation control
            return {
                **super().checkpoint_meta(),
                "weighting": None,
                "kd_weight": 0.0,
                "distilled_share": 0.0,
                "init": self.s2.init,
                **self._group_meta(),
            }
        return {
            **super().checkpoint_meta(),
            "weighting": dataclasses.asdict(self.wcfg),
            "kd_weight": self.lam,
            "init": self.s2.init,
            "t_init": self.s2.t_init,
            **self._group_meta(),
            "segmenter": self.sv.segmenter.id,
            **summarize_weights(self.pairs, self.weights, self.wcfg.n_t),
        }

    def checkpoint_extra(self) -> dict[str, Any]:
        proj = {k: v.detach().cpu() for k, v in self.objective.proj.state_dict().items()}
        return {**super().checkpoint_extra(), "kd_proj": proj, "group_hist": dict(self.group_hist)}

    def load_extra(self, ckpt: dict[str, Any]) -> None:
        super().load_extra(ckpt)
        self.objective.proj.load_state_dict(ckpt["kd_proj"])
        self.group_hist = {int(e): list(h) for e, h in ckpt.get("group_hist", {}).items()}

    def _group_meta(self) -> dict[str, Any]:
        """Tuples drawn per epoch and group, as ``{epoch: {D1: n, ..., D4: n, none: n}}``."""
        names = [*GROUPS, "none"]
        return {
            "sampling": self.s2.sampling,
            "group_histogram": {
                str(e): dict(zip(names, h, strict=True)) for e, h in sorted(self.group_hist.items())
            },
        }


def _finished(run_dir: Path) -> dict[str, Any] | None:
    f = run_dir / "summary.json"
    return json.loads(f.read_text()) if f.is_file() and (run_dir / "last.pt").is_file() else None


def load_trained(run_dir: Path) -> VprModel:
    """The model of a finished stage (eval mode)."""
    return model_from_checkpoint(read_checkpoint(run_dir / "last.pt"), source=str(run_dir)).eval()


# --------------------------------------------------------------------------- the method


class StructVPR:
    """One StructVPR experiment: places, segmentation, SLME bank and the stages, sharing their caches."""

    def __init__(self, cfg: StructVPRConfig) -> None:
        self.cfg = cfg
        torch.set_num_threads(cfg.threads)
        self.root = Path(cfg.dir)
        self.train_places, self.test_places = build_structvpr_places(cfg)
        self.size = (int(cfg.input_size[0]), int(cfg.input_size[1]))
        self.degrader = Degrader(cfg.degradation.specs)
        self._segmenter: Segmenter | None = None
        self.cache = LabelCache(cfg.segmentation.cache_dir)
        self.bank: SLMEBank | None = None
        log.info("%s | %s", self.train_places.summary(), self.test_places.summary())

    # ------------------------------------------------------------------ segmentation

    @property
    def segmenter(self) -> Segmenter:
        if self._segmenter is None:
            self._segmenter = make_segmenter(self.cfg.segmentation)
        return self._segmenter

    def segment(self, paths: Sequence[str | Path]) -> SLMEBank:
        """Step 1-2: label maps (cached) -> SLME bank."""
        if self.bank is None:
            slme = dataclasses.replace(self.cfg.slme, size=list(self.cfg.slme.size or self.size))
            self.bank = SLMEBank(SLMEncoder(slme, self.segmenter.classes), tuple(slme.size))
        segment_into(self.bank, paths, self.segmenter, self.cache, self.cfg.progress)
        return self.bank

    def segment_training(self) -> SLMEBank:
        p = self.train_places
        return self.segment([r.path for r in p.queries] + [r.path for r in p.database])

    # ------------------------------------------------------------------ models and tuples

    def new_rgb(self) -> VprModel:
        m = create_model("structvpr_mobilenetv2", pretrained=True)
        m.preprocess = dataclasses.replace(m.preprocess, input_size=self.size)
        return m

    def new_seg(self) -> VprModel:
        b = self.cfg.seg_branch
        m = create_model(
            "structvpr_segbranch",
            in_channels=len(self.cfg.slme.groups),
            channels=list(b.channels),
            blocks=list(b.blocks),
            expand=b.expand,
        )
        m.preprocess = dataclasses.replace(m.preprocess, input_size=tuple(self.cfg.slme.size or self.size))
        return m

    def tuples(
        self,
        student: VprModel,
        *,
        rgb: bool,
        slme: bool,
        weights: Callable[[int, int], float] | None = None,
        pairs: Pairs | None = None,
        sampling: str = "pairs",
    ) -> StructTuples:
        d = self.cfg.data
        return StructTuples(
            self.train_places,
            self.segment_training() if slme else None,
            rgb=rgb,
            weights=weights,
            pairs=pairs,
            sampling=sampling,
            n_t=self.cfg.stage2.weighting.n_t,
            preprocess=student.preprocess if rgb else Preprocess(input_size=self.size),
            degrader=self.degrader,
            negatives=d.negatives,
            targets=self.cfg.degradation.targets,
            seed=self.cfg.seed,
            pool=d.mining_pool,
        )

    def stage_recipe(self, name: str, stage: StageConfig) -> StageRecipe:
        """The engine recipe of one stage: this recipe's tuples (``data``), degradation, optimiser (at the
        stage's learning rate) and seed; the stage's steps, batch and schedule; CPU; run dir DIR/name."""
        c = self.cfg
        return StageRecipe(
            data=c.data,
            degradation=c.degradation,
            optim=dataclasses.replace(c.optim, lr=stage.lr),
            schedule=ScheduleConfig(
                epochs=stage.steps,  # as many as the steps need; max_steps ends the stage
                max_steps=stage.steps,
                batch_size=stage.batch_size,
                scheduler=stage.scheduler,
                warmup_steps=stage.warmup_steps,
                log_every=c.log_every,
                val_every=0,
                ckpt_every=c.ckpt_every,
            ),
            run=RunConfig(dir=str(self.root / name), seed=c.seed, device="cpu", progress=c.progress),
        )

    def _run_stage(self, trainer: type[StageTrainer], name: str, stage: StageConfig, **kw: Any) -> Path:
        """Run a stage unless it finished before; a stage killed midway resumes from its last.pt."""
        run_dir = self.root / name
        if not _finished(run_dir):
            resume = (run_dir / "last.pt").is_file()
            run_trainer(trainer, self, name, stage, resume=resume, **kw)
        return run_dir

    # ------------------------------------------------------------------ Stage I

    def stage1_rgb(self) -> Path:
        """The rgb-branch: ImageNet MobileNetV2 student trained with the triplet loss."""
        return self._run_stage(RgbBranchStage, "stage1_rgb", self.cfg.rgb_stage1)

    def stage1_seg(self) -> Path:
        """The seg-branch: trained from scratch on SLME maps with the triplet loss."""
        return self._run_stage(SegBranchStage, "stage1_seg", self.cfg.seg_stage1)

    # ------------------------------------------------------------------ partition

    def partition(self, rank: str | None = None) -> Pairs:
        """Ranks x (seg-branch) and y (rgb-branch) of every training pair, counted as ``rank`` (default:
        the recipe's ``stage2.weighting.rank``); cached as ``partition.npz`` (``partition_<rank>.npz``
        for a rank other than the paper's ``list``), recomputed when the cached file counted otherwise."""
        rank = rank or self.cfg.stage2.weighting.rank
        stem = "partition" if rank == "list" else f"partition_{rank}"
        path = self.root / f"{stem}.npz"
        if path.is_file():
            z = np.load(path)
            if "rank" in z and str(z["rank"]) == rank:
                return Pairs(z["q"], z["p"], z["x"], z["y"])
        rgb, seg = load_trained(self.root / "stage1_rgb"), load_trained(self.root / "stage1_seg")
        p = self.train_places
        bank = self.segment_training()
        rgb_q = describe(rgb, degrade_queries(p, self.degrader, seed=self.cfg.seed))
        rgb_db = describe(rgb, [r.load() for r in p.database])
        seg_q = describe_slme(seg, bank, [r.path for r in p.queries])
        seg_db = describe_slme(seg, bank, [r.path for r in p.database])
        pairs = rank_pairs((seg_q, seg_db), (rgb_q, rgb_db), p.positives(), p.excluded(), rank=rank)
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, q=pairs.q, p=pairs.p, x=pairs.x, y=pairs.y, rank=rank)
        shares = group_shares(pairs, self.cfg.stage2.weighting.n_t)
        atomic_write_text(
            self.root / f"{stem}.json",
            json.dumps(
                {
                    "pairs": len(pairs),
                    "rank": rank,
                    "n_t": self.cfg.stage2.weighting.n_t,
                    "shares": shares,
                    "paper_shares": PAPER_SHARES,
                },
                indent=2,
            )
            + "\n",
        )
        log.info(
            "partition of %d pairs (rank %s): %s",
            len(pairs),
            rank,
            "  ".join(f"{k} {100 * v:.1f}%" for k, v in shares.items()),
        )
        return pairs

    # ------------------------------------------------------------------ Stage II

    def stage2(
        self,
        name: str = "stage2",
        weighting: WeightingConfig | None = None,
        kd_weight: float | None = None,
        stage: Stage2Config | None = None,
    ) -> Path:
        """The student: triplet + weighted distillation from the frozen seg-branch; ``stage`` (default: the
        recipe's ``stage2``) gives steps, initialisation, T and sampling, ``weighting`` / ``kd_weight``
        override its own."""
        s2 = stage or self.cfg.stage2
        return self._run_stage(
            DistillStage,
            name,
            s2,
            weighting=weighting or s2.weighting,
            kd_weight=s2.kd_weight if kd_weight is None else kd_weight,
        )

    def export(self, name: str = "stage2", out: str | Path | None = None) -> Path:
        """Step 6: the Stage-II student alone as deployed weights (``structvpr_mobilenetv2``)."""
        return export_structvpr(self.root / name / "last.pt", out or self.root / f"{name}_deployed.pt")

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, model: VprModel, *, seg: bool = False) -> dict[str, dict[int, float]]:
        """Recall@1/5/10 on the test places per query degradation (database: high-quality frames)."""
        p = self.test_places
        out = {}
        if seg:
            self.segment([r.path for r in p.database])
            db = describe_slme(model, self.bank, [r.path for r in p.database])  # type: ignore[arg-type]
        else:
            db = describe(model, [r.load() for r in p.database])
        for spec in self.cfg.eval_degradations:
            label = TransmissionConfig.parse(spec).label
            if seg:
                files = (
                    [r.path for r in p.queries]
                    if spec == "none"
                    else received_files(p.queries, spec, Path(self.cfg.segmentation.cache_dir) / "received")
                )
                self.segment(files)
                q = describe_slme(model, self.bank, files)  # type: ignore[arg-type]
            else:
                cfg = TransmissionConfig.parse(spec)
                q = describe(model, [received_image(r.load(), cfg) for r in p.queries])
            rec = recall_on_places(q, db, p, (1, 5, 10))
            out[label] = {int(n): float(v) for n, v in rec.items()}
        return out

    # ------------------------------------------------------------------ everything

    def run(self, export_to: str | Path | None = None) -> dict[str, Any]:
        """Steps 1-6 with the configured Stage II; returns recalls, shares and timings."""
        self.segment_training()
        self.stage1_seg()
        self.stage1_rgb()
        pairs = self.partition()
        self.stage2()
        deployed = self.export(out=export_to)
        return {
            "deployed": str(deployed),
            "shares": group_shares(pairs, self.cfg.stage2.weighting.n_t),
            "test": self.evaluate(load_trained(self.root / "stage2")),
        }


#: The paper's shares of the four groups (MSLS training pairs), for comparison.
PAPER_SHARES = dict(zip(GROUPS, (0.041, 0.507, 0.148, 0.305), strict=True))


@torch.inference_mode()
def describe_slme(
    model: VprModel, bank: SLMEBank, paths: Sequence[str | Path], batch_size: int = 64
) -> np.ndarray:
    """(N, D) seg-branch descriptors of the SLME maps of ``paths`` (model left in eval mode)."""
    model.eval()
    out = [model(bank.tensor(paths[s : s + batch_size])).numpy() for s in range(0, len(paths), batch_size)]
    return np.concatenate(out).astype(np.float32) if out else np.empty((0, model.descriptor_dim), np.float32)


def export_structvpr(checkpoint: str | os.PathLike, out: str | os.PathLike, *, sidecar: bool = False) -> Path:
    """The student of a Stage-II checkpoint as deployed weights (a plain ``structvpr_mobilenetv2``), with the
    weighting and segmenter of its stage (its run directory's ``summary.json``) in ``meta``."""
    run_dir = Path(checkpoint).parent
    summary = _finished(run_dir) or {}
    return export_deployed(
        checkpoint,
        out,
        expected_name="structvpr_mobilenetv2",
        meta={
            "method": "structvpr",
            "stage": run_dir.name,
            "weighting": summary.get("weighting"),
            "segmenter_used_in_training": summary.get("segmenter"),
        },
        sidecar=sidecar,
    )


def train_structvpr(cfg: StructVPRConfig, *, resume: bool = True) -> TrainResult:
    """Steps 1-6 (:meth:`StructVPR.run`; finished stages are reused and a killed one resumes, whatever
    ``resume`` says); the result is Stage II's, with the test recalls as ``<degradation>/R@N``."""
    out = StructVPR(cfg).run()
    stage2 = Path(cfg.dir) / "stage2"
    summary = _finished(stage2) or {}
    metrics = {f"{label}/R@{n}": r for label, rec in out["test"].items() for n, r in rec.items()}
    log.info("wrote %s", out["deployed"])
    return TrainResult(
        stage2,
        stage2 / "last.pt",
        int(summary.get("steps", 0)),
        int(summary.get("epochs", 0)),
        float(summary.get("train_seconds", 0.0)),
        metrics,
    )


METHOD = Method(
    name="structvpr",
    summary="StructVPR: segmentation structure distilled into the RGB student (Stage I, partition, Stage II)",
    recipe=StructVPRConfig,
    validate=validate_structvpr,
    train=train_structvpr,
    export=export_structvpr,
)


def config_from_dict(data: dict[str, Any] | None, overrides: Sequence[str] = ()) -> StructVPRConfig:
    """A validated StructVPR recipe from a raw mapping plus ``key=value`` overrides."""
    return METHOD.config(data, overrides)


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> StructVPRConfig:
    """A validated StructVPR recipe from a YAML file plus ``key=value`` overrides."""
    return METHOD.load(path, overrides)


if __name__ == "__main__":
    sys.exit("python -m vpr_ros.training.methods.structvpr.pipeline moved: use `vpr-ros train --config R`")
