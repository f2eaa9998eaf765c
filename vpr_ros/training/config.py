"""Training recipes: the sections every method shares (``data``, ``degradation``, ``optim``, ``schedule``,
``run``), their checks, and the one way a recipe is read (YAML -> overrides -> typed dataclasses).

A method's recipe is a dataclass made of these sections and its own (``training/*.yaml``,
``docs/training.md``). Every problem raises :class:`~vpr_ros.core.errors.ConfigError` naming the dotted
key: an unknown key (with the valid keys), a wrong type, a value out of range. Strings may use ``${VAR}`` /
``${VAR:-default}`` environment variables (e.g. ``${VPR_ROS_SHARED:-../shared}``); relative paths are
relative to the working directory.
"""

from __future__ import annotations

import copy
import os
import types
import typing
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from vpr_ros.core.config_file import expand_env, load_yaml, parse_value
from vpr_ros.core.errors import ConfigError, TransmissionError
from vpr_ros.core.fileio import atomic_write_text
from vpr_ros.core.transmission import TransmissionConfig

DATA_KINDS = ("nordland", "folder", "bags")
MINING = ("random", "hard")
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
    """A labelled place source (queries, database, positives), its split, and the training tuples."""

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
class DegradationConfig:
    """The student's input degradation: one transmission spec per sample, drawn from ``specs``."""

    specs: list[str] = field(default_factory=lambda: ["jpeg:10"])
    targets: str = "all"  # all: every tuple image is degraded (paper) | query: only the query


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


# --------------------------------------------------------------------------- raw mapping -> dataclasses


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
    an unknown key or a wrong type raises :class:`ConfigError` naming the dotted key (prefixed ``where``)."""
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


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Set ``key.sub=value`` overrides (values read as YAML scalars/lists) in a raw recipe mapping;
    sections are created as needed."""
    for text in overrides:
        if "=" not in text:
            raise ConfigError(f"override {text!r}: expected key.sub=value")
        key, raw = text.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {text!r}: empty key part")
        value = parse_value(raw, where=f"override {key.strip()}")
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


def build_recipe(cls: type, data: dict[str, Any] | None, overrides: Sequence[str] = ()) -> Any:
    """Recipe dataclass ``cls`` from a raw mapping plus ``key=value`` overrides (the mapping is not
    changed); types and keys are checked, ranges are the method's ``validate``."""
    return build_config(cls, apply_overrides(copy.deepcopy(data or {}), overrides))


def read_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """The raw mapping of a recipe file (one-line ConfigError naming the file when it cannot be read)."""
    return load_yaml(Path(path), what="training recipe")


def save_recipe(cfg: Any, path: str | os.PathLike) -> None:
    """Write a resolved recipe dataclass as YAML (atomically): the run's ``config.yaml``."""
    atomic_write_text(path, yaml.safe_dump(asdict(cfg), sort_keys=False))


# --------------------------------------------------------------------------- checks of the shared sections


def check(cond: bool, where: str, text: str) -> None:
    """Raise ConfigError ``where: text`` unless ``cond``."""
    if not cond:
        raise ConfigError(f"{where}: {text}")


def _one_of(value: str, allowed: Sequence[str], where: str) -> None:
    check(value in allowed, where, f"{value!r} is not one of {', '.join(allowed)}")


def validate_data(d: DataConfig) -> None:
    """Range and consistency checks of a ``data`` section."""
    _one_of(d.kind, DATA_KINDS, "data.kind")
    check(
        bool(d.root), "data.root", "the dataset root is required (e.g. ${VPR_ROS_SHARED:-../shared}/data/...)"
    )
    check(d.pos_frames >= 0, "data.pos_frames", f"must be >= 0, got {d.pos_frames}")
    check(d.neg_frames >= d.pos_frames, "data.neg_frames", f"must be >= data.pos_frames, got {d.neg_frames}")
    check(d.pos_radius_m > 0, "data.pos_radius_m", f"must be > 0, got {d.pos_radius_m}")
    check(
        d.neg_radius_m >= d.pos_radius_m,
        "data.neg_radius_m",
        f"must be >= data.pos_radius_m ({d.pos_radius_m}), got {d.neg_radius_m}",
    )
    check(d.max_gap_s >= 0, "data.max_gap_s", f"must be >= 0, got {d.max_gap_s}")
    check(d.min_time_gap_s >= 0, "data.min_time_gap_s", f"must be >= 0, got {d.min_time_gap_s}")
    check(d.bag_every >= 1, "data.bag_every", f"must be >= 1, got {d.bag_every}")
    check(d.kind != "bags" or bool(d.bags), "data.bags", "list at least one bag for data.kind 'bags'")
    check(d.split.block > 0, "data.split.block", f"must be > 0, got {d.split.block}")
    check(d.split.val_every >= 2, "data.split.val_every", f"must be >= 2, got {d.split.val_every}")
    check(
        0 <= d.split.val_offset < d.split.val_every,
        "data.split.val_offset",
        f"must be in 0..{d.split.val_every - 1}, got {d.split.val_offset}",
    )
    check(d.split.gap >= 0, "data.split.gap", f"must be >= 0, got {d.split.gap}")
    check(d.negatives >= 1, "data.negatives", f"must be >= 1, got {d.negatives}")
    _one_of(d.mining, MINING, "data.mining")
    check(d.mining_pool >= d.negatives, "data.mining_pool", f"must be >= data.negatives, got {d.mining_pool}")
    check(d.cache_every >= 0, "data.cache_every", f"must be >= 0, got {d.cache_every}")
    for key in ("max_train_queries", "max_val_queries", "limit"):
        v = getattr(d, key)
        check(v is None or v >= 1, f"data.{key}", f"must be >= 1 or null, got {v}")
    check(d.workers >= 0, "data.workers", f"must be >= 0, got {d.workers}")


def validate_degradation(deg: DegradationConfig) -> None:
    """Every spec parses; ``targets`` is known."""
    check(bool(deg.specs), "degradation.specs", "list at least one spec ('none' for no degradation)")
    for i, spec in enumerate(deg.specs):
        try:
            TransmissionConfig.parse(spec)
        except TransmissionError as exc:
            raise ConfigError(f"degradation.specs[{i}]: {exc}") from None
    _one_of(deg.targets, DEGRADE_TARGETS, "degradation.targets")


def validate_loop(o: OptimConfig, s: ScheduleConfig, r: RunConfig) -> None:
    """Checks of the sections the engine's loop reads (``optim``, ``schedule``, ``run``)."""
    validate_optim(o)
    validate_schedule(s)
    validate_run(r)


def validate_optim(o: OptimConfig) -> None:
    _one_of(o.name, OPTIMIZERS, "optim.name")
    check(o.lr > 0, "optim.lr", f"must be > 0, got {o.lr}")
    check(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
    check(o.grad_clip >= 0, "optim.grad_clip", f"must be >= 0, got {o.grad_clip}")


def validate_schedule(s: ScheduleConfig) -> None:
    check(s.epochs >= 1, "schedule.epochs", f"must be >= 1, got {s.epochs}")
    check(s.max_steps is None or s.max_steps >= 1, "schedule.max_steps", f"must be >= 1, got {s.max_steps}")
    check(s.batch_size >= 1, "schedule.batch_size", f"must be >= 1, got {s.batch_size}")
    _one_of(s.scheduler, SCHEDULERS, "schedule.scheduler")
    for key in ("warmup_steps", "val_every"):
        check(getattr(s, key) >= 0, f"schedule.{key}", f"must be >= 0, got {getattr(s, key)}")
    for key in ("log_every", "ckpt_every", "step_size"):
        check(getattr(s, key) >= 1, f"schedule.{key}", f"must be >= 1, got {getattr(s, key)}")
    check(0 < s.gamma <= 1, "schedule.gamma", f"must be in (0, 1], got {s.gamma}")


def validate_run(r: RunConfig) -> None:
    check(bool(r.dir), "run.dir", "a run directory is required")
    check(r.val_batch_size >= 1, "run.val_batch_size", f"must be >= 1, got {r.val_batch_size}")
    check(
        bool(r.recall_ns) and min(r.recall_ns) >= 1, "run.recall_ns", f"must be positive, got {r.recall_ns}"
    )
