"""LoQI-VPR: distillation for visual place recognition on low-quality images.

Yang, Jin, Huang, Wang, Rizzo, Feng, "Distillation Improves Visual Place Recognition for Low Quality
Images" (arXiv 2310.06906). Two branches of the same architecture:

* teacher f_t, frozen, sees the high-quality image I^h;
* student f_s, initialised from the teacher, sees the low-quality image I^l (the transmitted frame);

trained with  L = L_ickd(z^l, z^h) + alpha * L_mse(v^l, v^h) + beta * L_triplet(v^l)  (the paper's
L_theta1 + alpha L_theta2 + beta L_theta3), where L_ickd compares the inter-channel correlations of the
latent codes z (the encoder's output: the last map of ``forward_features``), L_mse is the mean squared
error of the global descriptors v, and L_triplet is NetVLAD's weakly supervised ranking loss on the
student's low-quality descriptors (query, best-matching positive, hard negatives: squared distances,
summed over the negatives). Each term is switchable, so every row of the paper's ablation trains; the
earlier forms are named options (``loss.ickd_maps``, ``mse_reduction``, ``triplet_distance``,
``triplet_negatives``, ``margin``; docs/training.md).

Model-agnostic: any registered :class:`~vpr_ros.core.models.VprModel` whose ``forward_features``
returns its latent maps, the encoder's output last (StructVPR's three stages, GeM/NetVLAD's last stage).
Only the student is deployed; the teacher is a training-time device. This module holds the recipe
(:class:`TrainConfig`), the objective (:class:`LoQI`), the two branches and the stage on the engine
(:class:`LoQITrainer`, a :class:`~vpr_ros.training.engine.PlaceTrainer`).
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vpr_ros.core.errors import ConfigError, ModelError
from vpr_ros.core.models import create_model, model_from_checkpoint, read_checkpoint
from vpr_ros.core.models.registry import VprModel
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
from vpr_ros.training.engine import Method, PlaceTrainer, TrainResult, run_trainer
from vpr_ros.training.evaluate import describe, evaluate_model
from vpr_ros.training.export import export_deployed
from vpr_ros.training.losses import Correlation, correlation, ickd_loss, mse_loss, triplet_loss

TRIPLET_DISTANCES = ("squared", "euclidean")
TRIPLET_NEGATIVES = ("sum", "mean")
MSE_REDUCTIONS = ("mean", "sum")
LOSS_TERMS = ("loss", "ickd", "mse", "triplet")


# --------------------------------------------------------------------------- recipe


@dataclass
class ModelConfig:
    name: str = "structvpr_mobilenetv2"
    config: dict[str, Any] = field(default_factory=dict)  # registry config keys of the model
    input_size: list[int] | None = None  # [H, W]; None keeps the registry's preprocessing
    init: str = "teacher"  # teacher | imagenet | random | <checkpoint path>
    teacher: str | None = None  # checkpoint path | imagenet | None (no distillation)
    freeze: list[str] = field(default_factory=list)  # parameter-name prefixes kept fixed


@dataclass
class LossConfig:
    """L = ickd_weight * L_ickd + alpha * L_mse + beta * L_triplet, each term switchable (LoQI's
    L = L_theta1 + alpha L_theta2 + beta L_theta3); the defaults are the paper's forms (docs/training.md)."""

    ickd: bool = True
    mse: bool = True
    triplet: bool = True
    ickd_weight: float = 1.0
    alpha: float = 1000.0  # MSE weight: the authors' term balance (docs/training.md, "alpha and beta")
    beta: float = 5.0  # triplet weight, likewise
    margin: float = 0.1  # NetVLAD's m, in the units of triplet_distance
    triplet_distance: str = "squared"  # squared (NetVLAD Eq. 7) | euclidean
    triplet_negatives: str = "sum"  # sum over a query's negatives (NetVLAD Eq. 7) | mean
    mse_reduction: str = "mean"  # mean over all elements (MSE) | sum (over dimensions, mean over the batch)
    ickd_maps: list[int] | None = None  # indices into forward_features(); None: the latent code z (the last)
    # compute the frozen teacher's outputs (ICKD correlations, descriptor) once per training image and
    # reuse them when the image is drawn again: the same loss values, fewer teacher passes (in memory)
    cache_teacher: bool = False


@dataclass
class TrainConfig:
    """A LoQI recipe (``training/loqi_*.yaml``, ``training/teacher_nordland.yaml``)."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    degradation: DegradationConfig = field(default_factory=DegradationConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def distills(self) -> bool:
        return self.loss.ickd or self.loss.mse


def validate_loss(lo: LossConfig) -> None:
    """Checks of a ``loss`` section of the LoQI terms."""
    check(lo.ickd or lo.mse or lo.triplet, "loss", "enable at least one of ickd, mse, triplet")
    for key in ("ickd_weight", "alpha", "beta"):
        check(getattr(lo, key) >= 0, f"loss.{key}", f"must be >= 0, got {getattr(lo, key)}")
    check(lo.margin > 0, "loss.margin", f"must be > 0, got {lo.margin}")
    for key, allowed in (
        ("triplet_distance", TRIPLET_DISTANCES),
        ("triplet_negatives", TRIPLET_NEGATIVES),
        ("mse_reduction", MSE_REDUCTIONS),
    ):
        value = getattr(lo, key)
        check(value in allowed, f"loss.{key}", f"{value!r} is not one of {', '.join(allowed)}")


def validate(cfg: TrainConfig) -> TrainConfig:
    """Range and consistency checks of a LoQI recipe; raises ConfigError naming the key."""
    m, lo = cfg.model, cfg.loss
    validate_data(cfg.data)
    check(bool(m.name), "model.name", "a registered model name is required")
    if m.input_size is not None:
        check(
            len(m.input_size) == 2 and min(m.input_size) >= 16,
            "model.input_size",
            f"must be [H, W] with H, W >= 16, got {m.input_size}",
        )
    check(bool(m.init), "model.init", "must be teacher, imagenet, random or a checkpoint path")
    check(
        not (m.init == "teacher" and m.teacher is None),
        "model.init",
        "'teacher' needs model.teacher (a checkpoint path or imagenet); use imagenet or random without one",
    )
    validate_degradation(cfg.degradation)
    validate_loss(lo)
    check(
        not (cfg.distills and m.teacher is None),
        "model.teacher",
        "loss.ickd / loss.mse distil from a teacher: set model.teacher (checkpoint path or imagenet)",
    )
    check(
        not lo.cache_teacher or cfg.distills,
        "loss.cache_teacher",
        "caches the teacher's outputs for loss.ickd / loss.mse: enable one of them or set it false",
    )
    validate_loop(cfg.optim, cfg.schedule, cfg.run)
    return cfg


def forward_outputs(
    model: VprModel, x: torch.Tensor, *, maps: bool, desc: bool
) -> tuple[list[torch.Tensor] | None, torch.Tensor | None]:
    """Latent maps and/or global descriptor of a batch, in one pass when the model can aggregate its
    own maps (``model.aggregate``, e.g. StructVPR), else by ``forward_features`` and ``forward``."""
    if maps and desc and callable(getattr(model, "aggregate", None)):
        fmaps = model.forward_features(x)
        return fmaps, model.aggregate(fmaps)
    return (model.forward_features(x) if maps else None), (model(x) if desc else None)


def _take_rows(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """``x[rows]`` in ``x``'s memory format (the data pipeline's batches are channels_last, which the
    convolutions run markedly faster on than on the contiguous copy ``index_select`` makes)."""
    out = x.index_select(0, torch.tensor(rows, device=x.device))
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        out = out.contiguous(memory_format=torch.channels_last)
    return out


class TeacherCache:
    """The frozen teacher's outputs per training image, computed the first time the image is drawn.

    Exact, not an approximation: the teacher is frozen and in eval mode (BatchNorm uses its running
    statistics, so an image's outputs do not depend on the rest of its batch), and its input, the
    high-quality image resized and normalised, is the same every time it is drawn (the trainer refuses
    the cache for a dataset that does not declare ``deterministic_hq``). It keeps only what the losses
    read: per distilled map the row-normalised channel correlation (:class:`~.losses.Correlation`:
    C x C, or F (C x HW) and 1/D when HW < C/3, the smaller) and the descriptor. In memory, on the
    training device; after a resume it refills itself. ``hits`` / ``misses`` count looked-up images.
    """

    def __init__(
        self, teacher: VprModel, *, maps: bool, desc: bool, select: Callable[[list], list] | None = None
    ) -> None:
        self.teacher, self.maps, self.desc = teacher, maps, desc
        self.select = select or (lambda m: m)
        self.slots: dict[int, int] = {}  # image id -> row of the store
        self.store: list[torch.Tensor] = []  # per stored tensor: (capacity, ...); rows = images
        self.forms: list[tuple[bool, ...]] = []  # per map: which Correlation fields are held
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self.slots)

    @property
    def nbytes(self) -> int:
        """Bytes held for the cached images (the store's spare capacity not counted)."""
        return len(self.slots) * sum(t[0].numel() * t.element_size() for t in self.store)

    def _flatten(self, corrs: list[Correlation] | None, desc: torch.Tensor | None) -> list[torch.Tensor]:
        parts = [t for c in corrs or [] for t in (c.dense, c.fmap, c.scale, c.sq) if t is not None]
        return parts + ([desc] if desc is not None else [])

    def _unflatten(self, parts: list[torch.Tensor]) -> tuple[list[Correlation] | None, torch.Tensor | None]:
        it = iter(parts)
        corrs = [Correlation(*(next(it) if held else None for held in form)) for form in self.forms]
        return (corrs if self.maps else None), (next(it) if self.desc else None)

    def _put(self, keys: list[int], corrs: list[Correlation] | None, desc: torch.Tensor | None) -> None:
        if not self.store:
            self.forms = [tuple(t is not None for t in (c.dense, c.fmap, c.scale, c.sq)) for c in corrs or []]
        parts = self._flatten(corrs, desc)
        n, m = len(self.slots), len(keys)
        if not self.store or n + m > len(self.store[0]):  # grow by doubling (amortised copies)
            cap = max(64, n + m, 2 * len(self.store[0]) if self.store else 0)
            grown = [p.new_empty((cap, *p.shape[1:])) for p in parts]
            for new, old in zip(grown, self.store, strict=False):
                new[:n] = old[:n]
            self.store = grown
        for t, p in zip(self.store, parts, strict=True):
            t[n : n + m] = p
        self.slots.update({k: n + j for j, k in enumerate(keys)})

    @torch.no_grad()
    def __call__(
        self, hq: torch.Tensor, ids: torch.Tensor
    ) -> tuple[list[Correlation] | None, torch.Tensor | None]:
        """Teacher correlations and descriptors of the images ``hq`` (N, 3, H, W) with dataset ids (N,)."""
        keys = [int(i) for i in ids.tolist()]
        first: dict[int, int] = {}  # images not cached yet -> their first row in the batch
        for row, key in enumerate(keys):
            if key not in self.slots:
                first.setdefault(key, row)
        self.misses += len(first)
        self.hits += len(keys) - len(first)
        if first:
            rows = list(first.values())
            x = hq if rows == list(range(len(hq))) else _take_rows(hq, rows)
            t_maps, t_desc = forward_outputs(self.teacher, x, maps=self.maps, desc=self.desc)
            corrs = [correlation(m) for m in self.select(t_maps)] if self.maps else None
            self._put(list(first), corrs, t_desc)
        idx = torch.tensor([self.slots[k] for k in keys], device=self.store[0].device)
        return self._unflatten([t.index_select(0, idx) for t in self.store])


class LoQI(nn.Module):
    """Student + frozen teacher; ``forward(hq, lq)`` returns the loss terms of one batch of tuples.

    ``hq`` / ``lq``: (B, T, 3, H, W) tuples (query, positive, negatives...) as the teacher / student
    see them. Returns ``{"loss": total, "ickd": ..., "mse": ..., "triplet": ...}`` (enabled terms only).
    With a :class:`TeacherCache` and the images' dataset ``ids`` (B, T), the teacher's outputs come
    from the cache (``loss.cache_teacher``): the same loss values, without the teacher's forward pass
    for images drawn before.
    """

    def __init__(
        self,
        student: VprModel,
        teacher: VprModel | None,
        loss: LossConfig,
        *,
        teacher_cache: TeacherCache | None = None,
    ) -> None:
        super().__init__()
        if (loss.ickd or loss.mse) and teacher is None:
            raise ConfigError("loss.ickd / loss.mse need a teacher (model.teacher)")
        self.student = student
        self.teacher = teacher
        self.cfg = loss
        self.teacher_cache = teacher_cache
        if teacher is not None:
            teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> LoQI:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # frozen: BatchNorm keeps its statistics
        return self

    def select_maps(self, maps: list) -> list:
        """The maps ICKD distils: the latent code z (the last map, the encoder's output) by default, or
        the maps ``loss.ickd_maps`` lists by index (``[0, 1, 2]``: every StructVPR stage)."""
        idx = self.cfg.ickd_maps
        return [maps[-1]] if idx is None else [maps[i] for i in idx]

    def make_teacher_cache(self) -> TeacherCache:
        """An empty cache of this objective's teacher outputs (what its enabled losses read)."""
        assert self.teacher is not None
        return TeacherCache(self.teacher, maps=self.cfg.ickd, desc=self.cfg.mse, select=self.select_maps)

    def forward(
        self, hq: torch.Tensor, lq: torch.Tensor, ids: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        b, t = lq.shape[:2]
        s_maps, s_desc = forward_outputs(
            self.student, lq.flatten(0, 1), maps=cfg.ickd, desc=cfg.mse or cfg.triplet
        )
        parts: dict[str, torch.Tensor] = {}
        if cfg.ickd or cfg.mse:
            assert self.teacher is not None
            if self.teacher_cache is not None and ids is not None:
                t_corr, t_desc = self.teacher_cache(hq.flatten(0, 1), ids.flatten())
            else:
                with torch.no_grad():
                    t_maps, t_desc = forward_outputs(
                        self.teacher, hq.flatten(0, 1), maps=cfg.ickd, desc=cfg.mse
                    )
                t_corr = self.select_maps(t_maps) if cfg.ickd else None
            if cfg.ickd:
                parts["ickd"] = ickd_loss(self.select_maps(s_maps), t_corr)
            if cfg.mse:
                parts["mse"] = mse_loss(s_desc, t_desc, reduction=cfg.mse_reduction)
        if cfg.triplet:
            if t < 3:
                raise ValueError(f"the triplet loss needs tuples of query, positive and negatives, got T={t}")
            d = s_desc.view(b, t, -1)
            parts["triplet"] = triplet_loss(
                d[:, 0],
                d[:, 1],
                d[:, 2:],
                cfg.margin,
                squared=cfg.triplet_distance == "squared",
                negatives_reduction=cfg.triplet_negatives,
            )
        weights = {"ickd": cfg.ickd_weight, "mse": cfg.alpha, "triplet": cfg.beta}
        total = sum(weights[k] * v for k, v in parts.items())
        return {"loss": total, **parts}


# --------------------------------------------------------------------------- building the two branches


def _with_input_size(model: VprModel, size: list[int] | None) -> VprModel:
    if size is not None:
        model.preprocess = dataclasses.replace(model.preprocess, input_size=(int(size[0]), int(size[1])))
    return model


def load_branch(spec: str, cfg: ModelConfig, *, role: str) -> VprModel:
    """A model for ``role`` from ``spec``: ``imagenet``, ``random`` or a checkpoint path (deployed or
    training) that must hold ``cfg.name``."""
    if spec in ("imagenet", "random"):
        model = create_model(cfg.name, pretrained=spec == "imagenet", **cfg.config)
    else:
        path = Path(spec)
        ckpt = read_checkpoint(path)
        name = ckpt["model"]["name"]
        if name != cfg.name:
            raise ModelError(f"model.{role}: {path} holds model {name!r}, but the recipe trains {cfg.name!r}")
        if cfg.config and dict(ckpt["model"]["config"]) != {**ckpt["model"]["config"], **cfg.config}:
            raise ModelError(
                f"model.{role}: {path} has config {ckpt['model']['config']}, the recipe asks for {cfg.config}"
            )
        model = model_from_checkpoint(ckpt, source=str(path))
    return _with_input_size(model, cfg.input_size)


def build_branches(cfg: ModelConfig) -> tuple[VprModel, VprModel | None]:
    """(student, teacher) as the recipe says; the student starts as a copy of the teacher by default."""
    teacher = load_branch(cfg.teacher, cfg, role="teacher") if cfg.teacher else None
    if cfg.init == "teacher":
        if teacher is None:
            raise ConfigError("model.init 'teacher' needs model.teacher")
        student = copy.deepcopy(teacher)
    else:
        student = load_branch(cfg.init, cfg, role="init")
    if cfg.freeze:
        names = [n for n, _ in student.named_parameters()]
        for prefix in cfg.freeze:
            hits = [n for n in names if n.startswith(prefix)]
            if not hits:
                raise ConfigError(
                    f"model.freeze: prefix {prefix!r} matches no parameter of {cfg.name}; "
                    f"parameters start with e.g. {sorted({n.split('.')[0] for n in names})}"
                )
        for n, p in student.named_parameters():
            if any(n.startswith(prefix) for prefix in cfg.freeze):
                p.requires_grad_(False)
    return student, teacher


# --------------------------------------------------------------------------- the stage on the engine


class LoQITrainer(PlaceTrainer):
    """The engine's place stage with the LoQI objective: student and frozen teacher from ``model``, the
    teacher's outputs optionally cached (``loss.cache_teacher``), validation both by the student's own
    database descriptors (``R@N``, what a deployed model does) and by the teacher's (``teacher_db/R@N``,
    the paper's protocol)."""

    cfg: TrainConfig
    method = "loqi"
    loss_terms = LOSS_TERMS

    def __init__(self, cfg: TrainConfig, *, resume: bool = False) -> None:
        self.teacher_db: np.ndarray | None = None
        super().__init__(cfg, resume=resume)

    def build_models(self) -> tuple[VprModel, VprModel | None]:
        return build_branches(self.cfg.model)

    def build_objective(self) -> LoQI:
        objective = LoQI(self.student, self.teacher, self.cfg.loss)
        if self.cfg.loss.cache_teacher:
            if not getattr(self.dataset, "deterministic_hq", False):
                raise ConfigError(
                    "loss.cache_teacher: the training data does not declare deterministic high-quality "
                    f"images ({type(self.dataset).__name__}.deterministic_hq), so cached teacher outputs "
                    "could differ from fresh ones; set loss.cache_teacher: false"
                )
            objective.teacher_cache = objective.make_teacher_cache()
        return objective

    def compute_loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        dev = self.dist.device
        hq, lq = batch["hq"].to(dev, non_blocking=True), batch["lq"].to(dev, non_blocking=True)
        if self.objective.teacher_cache is not None:
            return self.model(hq, lq, batch["ids"])
        return self.model(hq, lq)

    def validate(self) -> dict[str, float]:
        metrics = super().validate()
        if self.teacher is not None:
            dev, bs, ns = self.dist.device, self.cfg.run.val_batch_size, self.cfg.run.recall_ns
            if self.teacher_db is None:
                self.teacher_db = describe(
                    self.teacher, [r.load() for r in self.val_places.database], device=dev, batch_size=bs
                )
            rec_t, _ = evaluate_model(
                self.student,
                self.val_places,
                self.val_queries,
                db_desc=self.teacher_db,
                device=dev,
                batch_size=bs,
                ns=ns,
            )
            metrics.update({f"teacher_db/R@{n}": float(rec_t[n]) for n in ns})
        self.metrics = metrics
        return metrics

    def val_columns(self) -> list[str]:
        return [*super().val_columns(), *(f"teacher_db/R@{n}" for n in self.cfg.run.recall_ns)]

    def checkpoint_meta(self) -> dict[str, Any]:
        return {**super().checkpoint_meta(), "teacher": self.cfg.model.teacher}


def train(cfg: TrainConfig, *, resume: bool = False) -> TrainResult:
    """Run (or, with ``resume``, continue) a LoQI recipe to its final step."""
    return run_trainer(LoQITrainer, cfg, resume=resume)


def export(checkpoint: str | os.PathLike, out: str | os.PathLike, *, sidecar: bool = False) -> Path:
    """The student of a LoQI training checkpoint as deployed weights."""
    return export_deployed(checkpoint, out, sidecar=sidecar)


METHOD = Method(
    name="loqi",
    summary="LoQI distillation of a low-quality student from a frozen teacher (ICKD + MSE + triplet)",
    recipe=TrainConfig,
    validate=validate,
    train=train,
    export=export,
)


def config_from_dict(data: dict[str, Any] | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """A validated LoQI recipe from a raw mapping plus ``key=value`` overrides."""
    return METHOD.config(data, overrides)


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> TrainConfig:
    """A validated LoQI recipe from a YAML file plus ``key=value`` overrides."""
    return METHOD.load(path, overrides)
