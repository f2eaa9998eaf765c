"""SciceVPR training (Wan et al., 2025): stage 1 the Super-CricaVPR teacher, stage 2 the SciceVPR student.

* **Stage ``teacher``** (``cricavpr_teacher_dinov2``): frozen DINOv2, trained fusion / token mixer / GeM /
  cross-image encoder, with the multi-similarity loss and its miner (Wang et al., CVPR 2019) on batches of
  P places x K images (GSV-Cities style; here a query and K-1 of its positives per place).
* **Stage ``student``** (``scicevpr_dinov2``): the backbone and the 1x1 fusion are copied from the stage-1
  checkpoint (``model.inherit``) and the fusion is frozen (``model.freeze``); the token mixer, GeM and the
  self-enhanced encoder are trained with ``L_T = gamma * L_MS + eta * L_D``, L_D the squared distance of the
  student's descriptors to the frozen teacher's descriptors of the *same batch* (the teacher's cross-image
  correlations are what is distilled). With ``reduce_dim`` in the model config, a PCA of the training
  database's descriptors is fitted at the end and stored in the same checkpoint.

The loop, logs, validation, atomic checkpoints, resume and DDP are the engine's: :class:`SciceTrainer` is a
:class:`~vpr_ros.training.engine.PlaceTrainer` with this method's place batches, models and objective. A
recipe has the shared ``data``, ``degradation``, ``optim``, ``schedule`` and ``run`` sections and its own
``stage``, ``model``, ``places`` and ``loss`` (see ``training/scicevpr_*.yaml`` and ``docs/scicevpr.md``)::

    vpr-ros train --config training/scicevpr_stage1.yaml
    vpr-ros train --config training/scicevpr_stage2.yaml
    vpr-ros export runs/scicevpr_stage2/last.pt scicevpr.pt
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, Sampler

from vpr_ros.core.errors import ConfigError, DatasetError, ModelError
from vpr_ros.core.fileio import atomic_write_text
from vpr_ros.core.models import create_model, model_from_checkpoint, read_checkpoint
from vpr_ros.core.models.registry import VprModel
from vpr_ros.core.models.scicevpr import CricaTeacher, RegionalDinoV2, SciceStudent
from vpr_ros.core.preprocess import to_tensor_batch
from vpr_ros.data.places import PlaceDataset
from vpr_ros.training.config import (
    DataConfig,
    DegradationConfig,
    OptimConfig,
    RunConfig,
    ScheduleConfig,
    check,
    validate_data,
    validate_degradation,
    validate_loop,
)
from vpr_ros.training.data import Degrader, ImageCache, sample_rng
from vpr_ros.training.engine import Method, PlaceTrainer, TrainResult
from vpr_ros.training.evaluate import describe, evaluate_model
from vpr_ros.training.export import export_deployed
from vpr_ros.training.losses import mse_loss

log = logging.getLogger("vpr_ros.training.methods.scicevpr")

STAGES = ("teacher", "student")
LOSS_TERMS = ("loss", "ms", "distill", "pos_pairs", "neg_pairs")


# --------------------------------------------------------------------------- multi-similarity loss and miner


def ms_mine(
    sim: torch.Tensor, labels: torch.Tensor, epsilon: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor]:
    """The multi-similarity miner: (positive, negative) pair masks (N, N) of a similarity matrix.

    For anchor i, a positive j is kept when ``S_ij - epsilon < max_k S_ik`` over its negatives k, and a
    negative k when ``S_ik + epsilon > min_j S_ij`` over its positives j (an anchor without negatives keeps no
    positive, one without positives keeps no negative).
    """
    same = labels[:, None] == labels[None, :]
    pos = same & ~torch.eye(len(labels), dtype=torch.bool, device=sim.device)
    neg = ~same
    s = sim.detach()
    hardest_neg = s.masked_fill(~neg, float("-inf")).amax(dim=1, keepdim=True)
    easiest_pos = s.masked_fill(~pos, float("inf")).amin(dim=1, keepdim=True)
    return pos & (s - epsilon < hardest_neg), neg & (s + epsilon > easiest_pos)


def multi_similarity_loss(
    emb: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 50.0,
    base: float = 0.0,
    epsilon: float = 0.1,
    mine: bool = True,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Multi-similarity loss (Wang et al., CVPR 2019) of embeddings (N, D) with place labels (N,).

    ``S = emb @ emb.T`` (cosine for L2-normalised embeddings); per anchor i with the (mined) positives P_i and
    negatives N_i::

        l_i = 1/alpha * log(1 + sum_{j in P_i} exp(-alpha (S_ij - base)))
            + 1/beta * log(1 + sum_{k in N_i} exp(beta (S_ik - base)))

    and the loss is the mean of l_i over all N anchors (those with no pair add 0), as in
    pytorch-metric-learning's ``MultiSimilarityLoss`` with ``MultiSimilarityMiner(epsilon)``, which CricaVPR
    and SciceVPR use (alpha=1, beta=50, base=0). Returns the loss and the fraction of positive / negative
    pairs kept.
    """
    if emb.ndim != 2 or labels.shape != emb.shape[:1]:
        raise ValueError(
            f"expected embeddings (N, D) and labels (N,), got {tuple(emb.shape)}, {tuple(labels.shape)}"
        )
    sim = emb @ emb.T
    same = labels[:, None] == labels[None, :]
    all_pos = same & ~torch.eye(len(labels), dtype=torch.bool, device=emb.device)
    all_neg = ~same
    pos, neg = ms_mine(sim, labels, epsilon) if mine else (all_pos, all_neg)

    def soft(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:  # log(1 + sum_keep exp(x)), per row
        x = x.masked_fill(~keep, float("-inf"))
        return torch.logsumexp(torch.cat([torch.zeros_like(x[:, :1]), x], dim=1), dim=1)

    per_anchor = soft(-alpha * (sim - base), pos) / alpha + soft(beta * (sim - base), neg) / beta
    stats = {
        "pos_pairs": float(pos.sum()) / max(1, int(all_pos.sum())),
        "neg_pairs": float(neg.sum()) / max(1, int(all_neg.sum())),
    }
    return per_anchor.mean(), stats


# --------------------------------------------------------------------------- recipe


@dataclass
class SciceModelConfig:
    name: str = "cricavpr_teacher_dinov2"  # the model this stage trains (registry name)
    config: dict[str, Any] = field(default_factory=dict)  # registry config: arch, image_size, reduce_dim...
    # DINOv2 backbone weights, the one line to change once they can be had: a local file (the official
    # dinov2_vits14_pretrain.pth / ..._vitb14_... or a timm state dict) or "hub"; it implies pretrained
    weights: str = ""
    pretrained: bool = False  # DINOv2 weights: weights / config.backbone_weights, else timm's tag
    teacher: str | None = None  # stage student: the stage-1 checkpoint (training or deployed)
    inherit: list[str] = field(default_factory=lambda: ["backbone", "fusion"])  # copied from the teacher
    freeze: list[str] = field(default_factory=lambda: ["fusion"])  # kept fixed (the backbone always is)
    pca_images: int = 1024  # training database images whose descriptors fit the reduce_dim PCA


@dataclass
class PlacesConfig:
    images_per_place: int = 4  # K: the query and K-1 of its positives; schedule.batch_size is P (places)


@dataclass
class SciceLossConfig:
    gamma: float = 1.0  # weight of L_MS
    eta: float = 1.0  # weight of L_D (stage student)
    alpha: float = 1.0
    beta: float = 50.0
    base: float = 0.0
    epsilon: float = 0.1
    mine: bool = True


@dataclass
class SciceConfig:
    stage: str = "teacher"
    data: DataConfig = field(default_factory=DataConfig)
    model: SciceModelConfig = field(default_factory=SciceModelConfig)
    places: PlacesConfig = field(default_factory=PlacesConfig)
    degradation: DegradationConfig = field(default_factory=lambda: DegradationConfig(specs=["none"]))
    loss: SciceLossConfig = field(default_factory=SciceLossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    run: RunConfig = field(default_factory=lambda: RunConfig(dir="runs/scicevpr"))


def validate_scice(cfg: SciceConfig) -> SciceConfig:
    """The checks of the shared sections, then this method's; raises ConfigError naming the key."""
    m, lo = cfg.model, cfg.loss
    validate_data(cfg.data)
    check(bool(m.name), "model.name", "a registered model name is required")
    validate_degradation(cfg.degradation)
    validate_loop(cfg.optim, cfg.schedule, cfg.run)
    check(cfg.stage in STAGES, "stage", f"{cfg.stage!r} is not one of {', '.join(STAGES)}")
    check(
        cfg.stage == "teacher" or bool(m.teacher),
        "model.teacher",
        "stage student distils from the stage-1 checkpoint: set model.teacher",
    )
    check(
        cfg.data.mining == "random",
        "data.mining",
        "SciceVPR samples place batches; hard pairs are the multi-similarity miner's job: use 'random'",
    )
    check(
        cfg.places.images_per_place >= 2,
        "places.images_per_place",
        f"must be >= 2, got {cfg.places.images_per_place}",
    )
    check(cfg.schedule.batch_size >= 2, "schedule.batch_size", "places per batch must be >= 2 (negatives)")
    for key in ("gamma", "eta", "alpha", "beta", "epsilon"):
        check(getattr(lo, key) >= 0, f"loss.{key}", f"must be >= 0, got {getattr(lo, key)}")
    check(lo.alpha > 0 and lo.beta > 0, "loss.alpha", "alpha and beta must be > 0")
    check(lo.gamma > 0 or (cfg.stage == "student" and lo.eta > 0), "loss.gamma", "no loss term is enabled")
    check(m.pca_images >= 1, "model.pca_images", f"must be >= 1, got {m.pca_images}")
    return cfg


# --------------------------------------------------------------------------- place batches


class PlaceGroups(Dataset):
    """Item k: K images of one place, the query and K-1 of its positives (drawn with (seed, epoch, k)).

    ``{"hq": (K, 3, H, W), "lq": (K, 3, H, W), "index": k}``: ``lq`` is what the student sees (degraded by
    ``degrader``: every image, or only the query with ``targets="query"``), ``hq`` what the teacher sees.
    """

    def __init__(
        self,
        places: PlaceDataset,
        *,
        preprocess,
        degrader: Degrader,
        images_per_place: int,
        targets: str = "all",
        seed: int = 0,
    ) -> None:
        if preprocess.input_size is None:
            raise DatasetError("training needs a fixed model input size")
        self.places, self.preprocess, self.degrader = places, preprocess, degrader
        self.k, self.targets, self.seed, self.epoch = int(images_per_place), targets, int(seed), 0
        self.index = [i for i, p in enumerate(places.positives()) if len(p)]
        if not self.index:
            raise DatasetError(f"{places.name}: no query has a positive")
        self.cache = ImageCache()

    def __len__(self) -> int:
        return len(self.index)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __getitem__(self, k: int) -> dict[str, Any]:
        rng = sample_rng(self.seed, self.epoch, k)
        qi = self.index[k]
        pos = self.places.positives()[qi]
        pick = rng.choice(pos, size=self.k - 1, replace=len(pos) < self.k - 1)
        records = [self.places.queries[qi], *(self.places.database[int(p)] for p in pick)]
        hq_images = [self.cache.get(r) for r in records]
        hq = to_tensor_batch(hq_images, self.preprocess)
        if self.degrader.identity:
            return {"hq": hq, "lq": hq, "index": k}
        lq = [
            self.degrader(im, rng) if (j == 0 or self.targets == "all") else im
            for j, im in enumerate(hq_images)
        ]
        return {"hq": hq, "lq": to_tensor_batch(lq, self.preprocess), "index": k}


class PlaceBatchSampler(Sampler):
    """Dataset indices in blocks of ``places`` mutually distinct places (one block = one batch).

    Two groups clash when a positive of one is "near" the other's query, so the place labels of a batch are
    exact. Per epoch the order is a permutation drawn from (seed, epoch), packed greedily into blocks; each of
    ``world`` processes takes every world-th block. The length is fixed (``len(dataset) // (places * world)``
    blocks per process), so resume and the engine's step count work as with ``DistributedSampler``.
    """

    def __init__(
        self,
        places: PlaceDataset,
        group_index: Sequence[int],
        *,
        places_per_batch: int,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        self.p, self.seed, self.rank, self.world = int(places_per_batch), int(seed), rank, world
        self.epoch = 0
        n = len(group_index)
        self.blocks_per_rank = n // (self.p * world)
        if self.blocks_per_rank == 0:
            raise DatasetError(
                f"{places.name}: {n} places cannot fill one batch of {self.p} places on each "
                f"of {world} processes"
            )
        q_of = {q: g for g, q in enumerate(group_index)}
        pos_inv: dict[int, set[int]] = {}
        near_inv: dict[int, set[int]] = {}
        positives, near = places.positives(), places.near()
        for g, q in enumerate(group_index):
            for d in positives[q]:
                pos_inv.setdefault(int(d), set()).add(g)
            for d in near[q]:
                near_inv.setdefault(int(d), set()).add(g)
        self.clash: list[set[int]] = []
        for q in group_index:
            c: set[int] = set()
            for d in near[q]:
                c |= pos_inv.get(int(d), set())
            for d in positives[q]:
                c |= near_inv.get(int(d), set())
            c.discard(q_of[q])
            self.clash.append(c)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def blocks(self) -> list[list[int]]:
        """All blocks of this epoch (every process computes the same list)."""
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, self.epoch, 0x5C1CE])
        need, n = self.blocks_per_rank * self.world, len(self.clash)
        out: list[list[int]] = []
        pending: list[int] = []
        fresh = False
        while len(out) < need:
            block: list[int] = []
            rest: list[int] = []
            for i, g in enumerate(pending):
                if all(g != b and g not in self.clash[b] for b in block):
                    block.append(g)
                    if len(block) == self.p:
                        rest.extend(pending[i + 1 :])
                        break
                else:
                    rest.append(g)
            if len(block) == self.p:
                out.append(block)
                pending, fresh = rest, False
            elif fresh:
                raise DatasetError(
                    f"cannot find {self.p} mutually distinct places for a batch; lower schedule.batch_size"
                )
            else:  # draw another permutation of all places behind the leftovers
                pending, fresh = pending + rng.permutation(n).tolist(), True
        return out

    def __iter__(self) -> Iterator[int]:
        for block in self.blocks()[self.rank :: self.world]:
            yield from block

    def __len__(self) -> int:
        return self.blocks_per_rank * self.p


# --------------------------------------------------------------------------- the method


class FullDescriptor(VprModel):
    """A view of a SciceVPR/CricaVPR model that outputs its unreduced descriptor (training, validation)."""

    def __init__(self, model: RegionalDinoV2) -> None:
        super().__init__()
        self.model = model
        self.name, self.config, self.preprocess = model.name, model.config, model.preprocess
        self.descriptor_dim = model.full_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.full_descriptor(x)


class SciceObjective(nn.Module):
    """``forward(hq, lq)`` on a batch (P, K, 3, H, W) of P places -> ``{"loss", "ms", "distill", ...}``.

    Stage teacher: the trained model is the cross-image teacher on ``hq``, L = gamma * L_MS. Stage student:
    the trained model is the student on ``lq``, L = gamma * L_MS + eta * L_D against the frozen ``teacher``'s
    descriptors of ``hq`` (one backbone pass when both share the frozen backbone and see the same images).
    """

    def __init__(
        self,
        model: RegionalDinoV2,
        teacher: CricaTeacher | None,
        loss: SciceLossConfig,
        *,
        shared_backbone: bool = False,
        same_input: bool = False,
    ) -> None:
        super().__init__()
        self.model, self.teacher, self.cfg = model, teacher, loss
        self.shared = shared_backbone and same_input
        if teacher is not None:
            teacher.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> SciceObjective:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def forward(self, hq: torch.Tensor, lq: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        p, k = hq.shape[:2]
        labels = torch.arange(p, device=hq.device).repeat_interleave(k)
        x = (lq if self.teacher is not None else hq).flatten(0, 1)
        tokens = self.model.backbone_tokens(x)
        desc = self.model.head(*tokens)
        ms, stats = multi_similarity_loss(
            desc, labels, alpha=cfg.alpha, beta=cfg.beta, base=cfg.base, epsilon=cfg.epsilon, mine=cfg.mine
        )
        out = {"ms": ms}
        total = cfg.gamma * ms
        if self.teacher is not None:
            with torch.no_grad():
                if self.shared:
                    t_desc = self.teacher.head(*tokens)
                else:
                    t_desc = self.teacher.full_descriptor(hq.flatten(0, 1))
            # L_D as the authors' code: MSELoss(reduction="sum") / batch, the squared distance per image
            out["distill"] = mse_loss(desc, t_desc, reduction="sum")
            total = total + cfg.eta * out["distill"]
        stat = {key: torch.tensor(v) for key, v in stats.items()}
        return {"loss": total, **out, **stat}


def inherit_weights(student: nn.Module, teacher: nn.Module, prefixes: Sequence[str]) -> list[str]:
    """Copy the tensors under ``prefixes`` from ``teacher`` into ``student``; returns their names."""
    s, t = student.state_dict(), teacher.state_dict()
    picked: dict[str, torch.Tensor] = {}
    for prefix in prefixes:
        keys = [k for k in s if k == prefix or k.startswith(prefix + ".")]
        if not keys:
            raise ConfigError(f"model.inherit: {prefix!r} names no parameter of the student")
        for k in keys:
            if k not in t or t[k].shape != s[k].shape:
                have = tuple(t[k].shape) if k in t else "(missing)"
                raise ModelError(
                    f"model.inherit: the teacher's {k} {have} does not fit the student's "
                    f"{tuple(s[k].shape)}; use the same arch, layers and image_size in both "
                    "stages"
                )
            picked[k] = t[k]
    student.load_state_dict({**s, **picked}, strict=True)
    return sorted(picked)


def freeze(model: nn.Module, prefixes: Sequence[str]) -> None:
    names = [n for n, _ in model.named_parameters()]
    for prefix in prefixes:
        if not any(n == prefix or n.startswith(prefix + ".") for n in names):
            raise ConfigError(
                f"model.freeze: {prefix!r} names no parameter; parameters start with "
                f"{sorted({n.split('.')[0] for n in names})}"
            )
    for n, prm in model.named_parameters():
        if any(n == prefix or n.startswith(prefix + ".") for prefix in prefixes):
            prm.requires_grad_(False)


def _fixed_input(model: RegionalDinoV2) -> RegionalDinoV2:
    model.preprocess = dataclasses.replace(model.preprocess, input_size=model.image_size)
    return model


def build_models(cfg: SciceConfig) -> tuple[RegionalDinoV2, CricaTeacher | None]:
    """(the model this stage trains, the frozen teacher or None)."""
    m = cfg.model
    config, pretrained = dict(m.config), m.pretrained
    if m.weights:
        config["backbone_weights"], pretrained = m.weights, True
    model = create_model(
        m.name,
        pretrained=pretrained and not (cfg.stage == "student" and "backbone" in m.inherit),
        **config,
    )
    want = CricaTeacher if cfg.stage == "teacher" else SciceStudent
    if not isinstance(model, want):
        raise ConfigError(
            f"model.name: stage {cfg.stage} trains a {want.__name__} (e.g. "
            f"{'cricavpr_teacher_dinov2' if cfg.stage == 'teacher' else 'scicevpr_dinov2'}), "
            f"{m.name!r} is a {type(model).__name__}"
        )
    teacher = None
    if cfg.stage == "student":
        ckpt = read_checkpoint(m.teacher)
        teacher = model_from_checkpoint(ckpt, source=str(m.teacher))
        if not isinstance(teacher, CricaTeacher):
            raise ModelError(
                f"model.teacher: {m.teacher} holds {ckpt['model']['name']!r}, not a cross-image "
                "teacher (train stage teacher first)"
            )
        copied = inherit_weights(model, teacher, m.inherit)
        log.info("student inherits %d tensors (%s) from %s", len(copied), ", ".join(m.inherit), m.teacher)
        _fixed_input(teacher)
    if m.freeze:
        freeze(model, m.freeze)
    return _fixed_input(model), teacher


def _same_backbone(a: RegionalDinoV2, b: RegionalDinoV2) -> bool:
    sa, sb = a.backbone.state_dict(), b.backbone.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --------------------------------------------------------------------------- the engine, with this method


class SciceTrainer(PlaceTrainer):
    """The engine's place stage (split, degradation, recall@N validation, loop, checkpoints, resume, DDP)
    with the SciceVPR hooks: place batches, the stage's models, the MS (+ distillation) objective,
    validation of the unreduced descriptor. ``self.student`` is the model being trained (teacher or
    student stage)."""

    cfg: SciceConfig
    method = "scicevpr"
    loss_terms = LOSS_TERMS

    def build_models(self) -> tuple[RegionalDinoV2, CricaTeacher | None]:
        return build_models(self.cfg)

    def build_dataset(self) -> PlaceGroups:
        cfg = self.cfg
        return PlaceGroups(
            self.train_places,
            preprocess=self.student.preprocess,
            degrader=self.degrader,
            images_per_place=cfg.places.images_per_place,
            targets=cfg.degradation.targets,
            seed=cfg.run.seed,
        )

    def build_sampler(self) -> PlaceBatchSampler:
        return PlaceBatchSampler(
            self.train_places,
            self.dataset.index,
            places_per_batch=self.cfg.schedule.batch_size,
            seed=self.cfg.run.seed,
            rank=self.dist.rank,
            world=self.dist.world,
        )

    def build_objective(self) -> SciceObjective:
        shared = self.teacher is not None and _same_backbone(self.student, self.teacher)
        objective = SciceObjective(
            self.student,
            self.teacher,
            self.cfg.loss,
            shared_backbone=shared,
            same_input=self.degrader.identity,
        )
        log.info("stage %s: shared backbone pass %s", self.cfg.stage, objective.shared)
        return objective

    def compute_loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        dev = self.dist.device
        return self.model(batch["hq"].to(dev, non_blocking=True), batch["lq"].to(dev, non_blocking=True))

    def checkpoint_meta(self) -> dict[str, Any]:
        return {**super().checkpoint_meta(), "stage": self.cfg.stage, "teacher": self.cfg.model.teacher}

    def validation_model(self) -> VprModel:
        """Validation ranks the unreduced descriptor (the PCA is fitted after training)."""
        return FullDescriptor(self.student)

    def fit_pca(self) -> None:
        """Fit the student's ``reduce_dim`` PCA on training database descriptors; validate the result."""
        model = self.student
        n = max(self.cfg.model.pca_images, model.reduce.out_features)
        db = self.train_places.database
        pick = np.unique(np.linspace(0, len(db) - 1, min(n, len(db))).round().astype(int))
        images = [db[int(i)].load() for i in pick]
        if len(images) < model.reduce.out_features:
            raise DatasetError(
                f"PCA to {model.reduce.out_features} dims needs as many training images, "
                f"{len(images)} available"
            )
        desc = describe(
            FullDescriptor(model), images, device=self.dist.device, batch_size=self.cfg.run.val_batch_size
        )
        model.fit_reduction(torch.from_numpy(desc))
        ns = self.cfg.run.recall_ns
        rec, _ = evaluate_model(
            model,
            self.val_places,
            self.val_queries or [],
            device=self.dist.device,
            batch_size=self.cfg.run.val_batch_size,
            ns=ns,
        )
        self.metrics.update({f"pca{model.descriptor_dim}/R@{k}": float(rec[k]) for k in ns})
        log.info(
            "PCA %d -> %d on %d images: %s",
            model.full_dim,
            model.descriptor_dim,
            len(images),
            "  ".join(f"R@{k} {100 * rec[k]:.1f}" for k in ns),
        )


def train_scicevpr(cfg: SciceConfig, *, resume: bool = False) -> TrainResult:
    """Run (or continue) one stage to its final step; stage student with ``reduce_dim`` then fits the PCA."""
    trainer = SciceTrainer(cfg, resume=resume)
    try:
        result = trainer.run()
        student = trainer.student
        if isinstance(student, SciceStudent) and student.reduce is not None and trainer.dist.main:
            if trainer.val_queries is None:
                trainer.validate()
            trainer.fit_pca()
            trainer.save()
            result.metrics = dict(trainer.metrics)
            summary = trainer.run_dir / "summary.json"
            if summary.is_file():
                info = json.loads(summary.read_text())
                info["metrics"] = result.metrics
                atomic_write_text(summary, json.dumps(info, indent=2) + "\n")
        return result
    finally:
        trainer.close()


def export_scicevpr(checkpoint: str | os.PathLike, out: str | os.PathLike, *, sidecar: bool = False) -> Path:
    """The trained model of a stage checkpoint as deployed weights (with its stage in ``meta``)."""
    stage = read_checkpoint(checkpoint).get("meta", {}).get("stage")
    return export_deployed(checkpoint, out, meta={"method": "scicevpr", "stage": stage}, sidecar=sidecar)


METHOD = Method(
    name="scicevpr",
    summary="SciceVPR: the cross-image teacher (stage teacher) or the distilled student (stage student)",
    recipe=SciceConfig,
    validate=validate_scice,
    train=train_scicevpr,
    export=export_scicevpr,
)

if __name__ == "__main__":
    sys.exit("python -m vpr_ros.training.methods.scicevpr moved: use `vpr-ros train --config R`, "
             "`vpr-ros export CHECKPOINT OUT` and `vpr-ros plot-losses RUN... --out F`")
