"""Training configuration: YAML recipe -> nested dataclasses, validated before anything is built.

A recipe has the sections ``data``, ``model``, ``degradation``, ``loss``, ``optim``, ``schedule``
and ``run`` (see ``training/*.yaml`` and ``docs/training.md``). Every problem raises
:class:`~vpr_ros.core.errors.ConfigError` naming the dotted key: an unknown key (with the valid
keys), a wrong type, a value out of range. Strings may use ``${VAR}`` / ``${VAR:-default}``
environment variables (e.g. ``${VPR_ROS_SHARED:-../shared}``); relative paths are relative to the
working directory.
"""

from __future__ import annotations

import os
import re
import types
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from vpr_ros.core.errors import ConfigError, TransmissionError
from vpr_ros.core.fileio import atomic_write_text
from vpr_ros.core.transmission import TransmissionConfig

DATA_KINDS = ("nordland", "folder", "bags")
MINING = ("random", "hard")
TRIPLET_DISTANCES = ("squared", "euclidean")
TRIPLET_NEGATIVES = ("sum", "mean")
MSE_REDUCTIONS = ("mean", "sum")
DEGRADE_TARGETS = ("all", "query")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("constant", "cosine", "step")


@dataclass
class SplitConfig:
    """Place split: blocks of ``block`` frames (frame data) or ``block`` metres (grid cells, position data);
    a block is validation when its number modulo ``val_every`` is ``val_offset``. Training places within
    ``gap`` frames / metres of a validation place are dropped, so validation places are unseen."""

    block: float = 100.0
    val_every: int = 5
    val_offset: int = 2
    gap: float = 10.0


@dataclass
class DataConfig:
    kind: str = "nordland"  # nordland | folder | bags
    root: str = ""
    # nordland: frame-aligned seasons, positives within +-pos_frames, negatives beyond +-neg_frames
    query_season: str = "winter"
    database_season: str = "summer"
    pos_frames: int = 2
    neg_frames: int = 10
    limit: int | None = None  # nordland: only the first `limit` places (quick runs)
    # folder (database/ + queries/ with @utm@ names or positions_csv) and bags: distances in metres
    positions_csv: str | None = None
    pos_radius_m: float = 10.0
    neg_radius_m: float = 25.0
    # bags: rosbag2 folders (relative to root), image/position topics, revisit rule
    bags: list[str] = field(default_factory=list)
    image_topic: str = "/camera/image_raw"
    position_topic: str = "/odom"
    max_gap_s: float = 0.2
    min_time_gap_s: float = 30.0
    bag_every: int = 1
    split: SplitConfig = field(default_factory=SplitConfig)
    # tuples
    negatives: int = 4
    mining: str = "random"  # random | hard (hardest of mining_pool candidates by a descriptor cache)
    mining_pool: int = 64
    cache_every: int = 0  # steps between descriptor-cache refreshes (0: at each epoch start)
    max_train_queries: int | None = None
    max_val_queries: int | None = None
    workers: int = 0


@dataclass
class ModelConfig:
    name: str = "structvpr_mobilenetv2"
    config: dict[str, Any] = field(default_factory=dict)  # registry config keys of the model
    input_size: list[int] | None = None  # [H, W]; None keeps the registry's preprocessing
    init: str = "teacher"  # teacher | imagenet | random | <checkpoint path>
    teacher: str | None = None  # checkpoint path | imagenet | None (no distillation)
    freeze: list[str] = field(default_factory=list)  # parameter-name prefixes kept fixed


@dataclass
class DegradationConfig:
    """The student's input degradation: one transmission spec per sample, drawn from ``specs``."""

    specs: list[str] = field(default_factory=lambda: ["jpeg:10"])
    targets: str = "all"  # all: every tuple image is degraded (paper) | query: only the query


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
class OptimConfig:
    name: str = "adam"
    lr: float = 1e-4
    weight_decay: float = 0.0
    momentum: float = 0.9
    grad_clip: float = 1.0  # max gradient norm; 0 disables


@dataclass
class ScheduleConfig:
    epochs: int = 1
    max_steps: int | None = None  # caps epochs * steps_per_epoch
    batch_size: int = 8  # tuples per process and step
    scheduler: str = "cosine"
    warmup_steps: int = 0
    step_size: int = 1000  # "step" scheduler: decay every step_size steps by gamma
    gamma: float = 0.5
    log_every: int = 10
    val_every: int = 0  # steps; 0: at the end of each epoch
    ckpt_every: int = 100


@dataclass
class RunConfig:
    dir: str = "runs/loqi"
    seed: int = 0
    device: str = "auto"
    tensorboard: bool = True
    progress: bool = True
    val_batch_size: int = 64
    recall_ns: list[int] = field(default_factory=lambda: [1, 5, 10])


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    degradation: DegradationConfig = field(default_factory=DegradationConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | os.PathLike) -> None:
        """Write the resolved config as YAML (atomically)."""
        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    @property
    def distills(self) -> bool:
        return self.loss.ickd or self.loss.mse


# --------------------------------------------------------------------------- parsing

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(text: str, *, where: str = "value") -> str:
    """Replace ``${VAR}`` and ``${VAR:-default}``; an unset variable without default is an error."""

    def sub(m: re.Match) -> str:
        value = os.environ.get(m.group(1))
        if value is None or value == "":
            if m.group(2) is None:
                raise ConfigError(f"{where}: environment variable {m.group(1)} is not set and has no default")
            return m.group(2)
        return value

    return _ENV.sub(sub, text)


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            if type(None) in typing.get_args(tp):
                return None
            raise ConfigError(f"{where}: must not be null")
        return _convert(value, args[0], where)
    if value is None:
        raise ConfigError(f"{where}: must not be null")
    if is_dataclass(tp):
        return build_config(tp, value, where)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return expand_env(str(value), where=where)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            if typing.get_args(tp)[0] is str and isinstance(value, str):
                value = [value]
            else:
                raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    raise ConfigError(f"{where}: unsupported type {tp}")  # pragma: no cover - programming error


def build_config(cls: type, data: Any, where: str = "") -> Any:
    """Dataclass ``cls`` from a raw mapping (nested dataclasses included), converting and checking types;
    an unknown key or a wrong type raises :class:`ConfigError` naming the dotted key (prefixed ``where``).
    Method recipes (StructVPR, SciceVPR) build their own dataclasses with it."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise ConfigError(
                f"unknown config key {dotted!r}; valid keys{' of ' + where if where else ''}: "
                f"{', '.join(names)}"
            )
        kwargs[key] = _convert(value, hints[key], dotted)
    return cls(**kwargs)


def _check(cond: bool, where: str, text: str) -> None:
    if not cond:
        raise ConfigError(f"{where}: {text}")


def validate(cfg: TrainConfig) -> TrainConfig:
    """Range and consistency checks; raises ConfigError naming the key."""
    d, m, lo, o, s, r = cfg.data, cfg.model, cfg.loss, cfg.optim, cfg.schedule, cfg.run
    _check(d.kind in DATA_KINDS, "data.kind", f"{d.kind!r} is not one of {', '.join(DATA_KINDS)}")
    _check(
        bool(d.root), "data.root", "the dataset root is required (e.g. ${VPR_ROS_SHARED:-../shared}/data/...)"
    )
    _check(d.pos_frames >= 0, "data.pos_frames", f"must be >= 0, got {d.pos_frames}")
    _check(d.neg_frames >= d.pos_frames, "data.neg_frames", f"must be >= data.pos_frames, got {d.neg_frames}")
    _check(d.pos_radius_m > 0, "data.pos_radius_m", f"must be > 0, got {d.pos_radius_m}")
    _check(
        d.neg_radius_m >= d.pos_radius_m,
        "data.neg_radius_m",
        f"must be >= data.pos_radius_m ({d.pos_radius_m}), got {d.neg_radius_m}",
    )
    _check(d.max_gap_s >= 0, "data.max_gap_s", f"must be >= 0, got {d.max_gap_s}")
    _check(d.min_time_gap_s >= 0, "data.min_time_gap_s", f"must be >= 0, got {d.min_time_gap_s}")
    _check(d.bag_every >= 1, "data.bag_every", f"must be >= 1, got {d.bag_every}")
    _check(d.kind != "bags" or bool(d.bags), "data.bags", "list at least one bag for data.kind 'bags'")
    _check(d.split.block > 0, "data.split.block", f"must be > 0, got {d.split.block}")
    _check(d.split.val_every >= 2, "data.split.val_every", f"must be >= 2, got {d.split.val_every}")
    _check(
        0 <= d.split.val_offset < d.split.val_every,
        "data.split.val_offset",
        f"must be in 0..{d.split.val_every - 1}, got {d.split.val_offset}",
    )
    _check(d.split.gap >= 0, "data.split.gap", f"must be >= 0, got {d.split.gap}")
    _check(d.negatives >= 1, "data.negatives", f"must be >= 1, got {d.negatives}")
    _check(d.mining in MINING, "data.mining", f"{d.mining!r} is not one of {', '.join(MINING)}")
    _check(
        d.mining_pool >= d.negatives, "data.mining_pool", f"must be >= data.negatives, got {d.mining_pool}"
    )
    _check(d.cache_every >= 0, "data.cache_every", f"must be >= 0, got {d.cache_every}")
    for key in ("max_train_queries", "max_val_queries", "limit"):
        v = getattr(d, key)
        _check(v is None or v >= 1, f"data.{key}", f"must be >= 1 or null, got {v}")
    _check(d.workers >= 0, "data.workers", f"must be >= 0, got {d.workers}")
    _check(bool(m.name), "model.name", "a registered model name is required")
    if m.input_size is not None:
        _check(
            len(m.input_size) == 2 and min(m.input_size) >= 16,
            "model.input_size",
            f"must be [H, W] with H, W >= 16, got {m.input_size}",
        )
    _check(bool(m.init), "model.init", "must be teacher, imagenet, random or a checkpoint path")
    _check(
        not (m.init == "teacher" and m.teacher is None),
        "model.init",
        "'teacher' needs model.teacher (a checkpoint path or imagenet); use imagenet or random without one",
    )
    _check(
        bool(cfg.degradation.specs), "degradation.specs", "list at least one spec ('none' for no degradation)"
    )
    for i, spec in enumerate(cfg.degradation.specs):
        try:
            TransmissionConfig.parse(spec)
        except TransmissionError as exc:
            raise ConfigError(f"degradation.specs[{i}]: {exc}") from None
    _check(
        cfg.degradation.targets in DEGRADE_TARGETS,
        "degradation.targets",
        f"{cfg.degradation.targets!r} is not one of {', '.join(DEGRADE_TARGETS)}",
    )
    _check(lo.ickd or lo.mse or lo.triplet, "loss", "enable at least one of ickd, mse, triplet")
    _check(
        not (cfg.distills and m.teacher is None),
        "model.teacher",
        "loss.ickd / loss.mse distil from a teacher: set model.teacher (checkpoint path or imagenet)",
    )
    _check(
        not lo.cache_teacher or cfg.distills,
        "loss.cache_teacher",
        "caches the teacher's outputs for loss.ickd / loss.mse: enable one of them or set it false",
    )
    for key in ("ickd_weight", "alpha", "beta"):
        _check(getattr(lo, key) >= 0, f"loss.{key}", f"must be >= 0, got {getattr(lo, key)}")
    _check(lo.margin > 0, "loss.margin", f"must be > 0, got {lo.margin}")
    for key, allowed in (
        ("triplet_distance", TRIPLET_DISTANCES),
        ("triplet_negatives", TRIPLET_NEGATIVES),
        ("mse_reduction", MSE_REDUCTIONS),
    ):
        value = getattr(lo, key)
        _check(value in allowed, f"loss.{key}", f"{value!r} is not one of {', '.join(allowed)}")
    _check(o.name in OPTIMIZERS, "optim.name", f"{o.name!r} is not one of {', '.join(OPTIMIZERS)}")
    _check(o.lr > 0, "optim.lr", f"must be > 0, got {o.lr}")
    _check(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
    _check(o.grad_clip >= 0, "optim.grad_clip", f"must be >= 0, got {o.grad_clip}")
    _check(s.epochs >= 1, "schedule.epochs", f"must be >= 1, got {s.epochs}")
    _check(s.max_steps is None or s.max_steps >= 1, "schedule.max_steps", f"must be >= 1, got {s.max_steps}")
    _check(s.batch_size >= 1, "schedule.batch_size", f"must be >= 1, got {s.batch_size}")
    _check(
        s.scheduler in SCHEDULERS,
        "schedule.scheduler",
        f"{s.scheduler!r} is not one of {', '.join(SCHEDULERS)}",
    )
    for key in ("warmup_steps", "val_every"):
        _check(getattr(s, key) >= 0, f"schedule.{key}", f"must be >= 0, got {getattr(s, key)}")
    for key in ("log_every", "ckpt_every", "step_size"):
        _check(getattr(s, key) >= 1, f"schedule.{key}", f"must be >= 1, got {getattr(s, key)}")
    _check(0 < s.gamma <= 1, "schedule.gamma", f"must be in (0, 1], got {s.gamma}")
    _check(bool(r.dir), "run.dir", "a run directory is required")
    _check(r.val_batch_size >= 1, "run.val_batch_size", f"must be >= 1, got {r.val_batch_size}")
    _check(
        bool(r.recall_ns) and min(r.recall_ns) >= 1, "run.recall_ns", f"must be positive, got {r.recall_ns}"
    )
    return cfg


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=1e-4"`` -> (["optim", "lr"], 1e-4); the value is read as a YAML scalar/list."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key.sub=value")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".")]
    if not all(parts):
        raise ConfigError(f"override {text!r}: empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from None
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set ``key.sub=value`` overrides in a raw config dict (sections are created as needed)."""
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for p in parts[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {text!r}: {p!r} is not a section")
            node = nxt
        node[parts[-1]] = value
    return data


def config_from_dict(data: dict[str, Any] | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Build and validate a :class:`TrainConfig` from a raw dict plus ``key=value`` overrides."""
    import copy

    raw = copy.deepcopy(data or {})
    apply_overrides(raw, list(overrides))
    return validate(build_config(TrainConfig, raw))


def load_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a YAML recipe, apply overrides, validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    try:
        return config_from_dict(data, overrides)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
