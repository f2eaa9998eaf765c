"""The method-agnostic training engine: the loop every method's stages run on (tqdm progress, ``train.csv`` /
``val.csv`` / TensorBoard logs, validation, atomic self-describing checkpoints, resume, DDP), the standard
place-recognition stage, and :class:`Method`, the record a method registers.

* :class:`Trainer` is one stage: a method subclasses it and fills in its hooks (data, models, objective,
  loss of a batch, validation, checkpoint contents); the loop itself is never copied.
* :class:`PlaceTrainer` is a :class:`Trainer` on labelled places (``data`` split by place, tuples of
  query / positive / negatives with optional hard mining, degraded queries, recall@N validation), which
  LoQI, SciceVPR and StructVPR's stages build on.
* Everything that can be wrong (data, split, models, resume state) fails with a clear error before the
  first step. ``last.pt`` is a ``kind="training"`` checkpoint (student weights, optimizer, scheduler,
  python/numpy/torch RNG states, step, epoch, recipe, the method's extras) written atomically every
  ``schedule.ckpt_every`` steps; ``resume=True`` continues from it after a kill and stops at the same final
  step (data order and degradations depend only on seed, epoch and index).
* DistributedDataParallel when started by ``torchrun`` (gloo on CPU, nccl on GPU; ``schedule.batch_size``
  is per process; only rank 0 validates and writes).
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from vpr_ros.core.errors import ConfigError, DatasetError, ModelError
from vpr_ros.core.fileio import atomic_write_text, remove_stale_temps
from vpr_ros.core.models import read_checkpoint, save_checkpoint, select_device
from vpr_ros.core.models.registry import VprModel
from vpr_ros.data.places import PlaceDataset
from vpr_ros.training.config import OptimConfig, build_recipe, read_recipe, save_recipe
from vpr_ros.training.data import (
    Degrader,
    TupleDataset,
    build_places,
    degrade_queries,
)
from vpr_ros.training.evaluate import describe, evaluate_model

log = logging.getLogger("vpr_ros.training")


@dataclass
class TrainResult:
    """What a finished run produced (the same on every rank)."""

    run_dir: Path
    checkpoint: Path
    steps: int
    epochs: int
    train_seconds: float
    metrics: dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------- distributed set-up


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def _init_distributed(device_pref: str) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist(device=select_device(device_pref))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_pref in ("auto", "cuda") or device_pref.startswith("cuda")
    device = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return _Dist(rank=rank, world=world, device=device, owns_group=owns)


# --------------------------------------------------------------------------- helpers


class _SkipSampler(Sampler):
    """The base sampler's order without its first ``skip`` items (resuming mid-epoch)."""

    def __init__(self, base: Sampler, skip: int) -> None:
        self.base, self.skip = base, skip

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(iter(self.base), self.skip, None)

    def __len__(self) -> int:
        return max(0, len(self.base) - self.skip)


class LrSchedule:
    """Learning-rate factor of a step: linear warm-up, then constant, cosine to 0, or step decay."""

    def __init__(
        self, kind: str, total: int, warmup: int = 0, step_size: int = 1000, gamma: float = 0.5
    ) -> None:
        self.kind, self.total, self.warmup, self.step_size, self.gamma = kind, total, warmup, step_size, gamma

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind == "cosine":
            span = max(1, self.total - self.warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - self.warmup) / span)))
        if self.kind == "step":
            return self.gamma ** ((step - self.warmup) // self.step_size)
        return 1.0


def make_optimizer(optim: OptimConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The recipe's optimizer (``optim.name``: adam, adamw or sgd) over ``params``."""
    if not params:
        raise ConfigError("no trainable parameter (model.freeze leaves none)")
    if optim.name == "sgd":
        return torch.optim.SGD(params, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)
    cls = torch.optim.AdamW if optim.name == "adamw" else torch.optim.Adam
    return cls(params, lr=optim.lr, weight_decay=optim.weight_decay)


def _rng_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


class CsvLog:
    """Append-only CSV; on resume, rows after the checkpoint's step are dropped (they will be redone)."""

    def __init__(self, path: Path, columns: list[str], *, keep_until: int | None) -> None:
        self.path, self.columns = path, columns
        rows: list[dict[str, str]] = []
        if keep_until is not None and path.is_file():
            with open(path, newline="", encoding="utf-8") as f:
                rows = [r for r in csv.DictReader(f) if int(float(r["step"])) <= keep_until]
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)

    def write(self, row: dict[str, Any]) -> None:
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore").writerow(
                {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}
            )


def _tensorboard(run_dir: Path, enabled: bool):
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter  # optional: needs the tensorboard package
    except ImportError:  # tensorboard not installed: CSV logs only
        log.info("tensorboard is not installed; logging to CSV only")
        return None
    return SummaryWriter(log_dir=str(run_dir / "tb"))



# --------------------------------------------------------------------------- the method record


@dataclass(frozen=True)
class Method:
    """A training method as the registry (:mod:`vpr_ros.training.methods`) and the CLI see it.

    ``recipe`` is the method's recipe dataclass (its sections; the shared ones are in
    :mod:`~vpr_ros.training.config`), ``validate`` checks ranges of a built recipe (ConfigError naming
    the key) and returns it, ``train(recipe, resume=...)`` runs the method's stages on the engine and
    returns the last stage's result, ``export(checkpoint, out, sidecar=...)`` writes the deployed student
    of a training checkpoint. ``sidecar`` is whether ``export`` writes ``OUT.json`` by default.
    """

    name: str
    summary: str
    recipe: type
    validate: Callable[[Any], Any]
    train: Callable[..., TrainResult]
    export: Callable[..., Path]
    sidecar: bool = False

    def config(self, data: dict[str, Any] | None, overrides: Sequence[str] = ()) -> Any:
        """A validated recipe from a raw mapping (an optional ``method:`` key must name this method)
        plus ``key=value`` overrides."""
        raw = dict(data or {})
        named = raw.pop("method", self.name)
        if named != self.name:
            raise ConfigError(f"method: the recipe names {named!r}, it is read as a {self.name!r} recipe")
        return self.validate(build_recipe(self.recipe, raw, overrides))

    def load(self, path: str | os.PathLike, overrides: Sequence[str] = ()) -> Any:
        """A validated recipe from a YAML file plus ``key=value`` overrides."""
        raw = read_recipe(path)
        try:
            return self.config(raw, overrides)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None


# --------------------------------------------------------------------------- the loop


class Trainer:
    """One training stage: the loop, logs, validation, atomic checkpoints, resume and DDP.

    A method subclasses ``Trainer`` (or :class:`PlaceTrainer`) and fills in the hooks:

    ===============================  =============================================================
    hook                             what it gives
    ===============================  =============================================================
    :meth:`build_places`             (training, validation) data; errors come before any model
    :meth:`build_models`             (the model being trained, a frozen teacher or None)
    :meth:`build_dataset`            training items by index (``set_epoch(epoch)`` each epoch)
    :meth:`build_sampler`            this process's item order (default ``DistributedSampler``)
    :meth:`build_objective`          the module whose forward gives the loss parts
    :meth:`compute_loss`             batch -> ``{"loss": total, part: value, ...}``
    :meth:`trainable_parameters`     what the optimizer updates (default: the student's)
    :meth:`start_epoch`,             called before an epoch's first batch / after each step
    :meth:`after_step`               (e.g. a hard-mining refresh)
    :meth:`validate`,                metrics on the validation data and their ``val.csv`` columns
    :meth:`val_columns`              (default: none, no validation)
    :meth:`checkpoint_meta`,         what the checkpoint says about the run / carries besides the
    :meth:`checkpoint_extra`,        student weights, and how a resume restores it
    :meth:`load_extra`
    ===============================  =============================================================

    Class attributes: ``method`` (the checkpoint's ``meta["method"]``) and ``loss_terms`` (the
    ``train.csv`` columns). ``cfg`` is the stage's recipe: a dataclass with ``optim``
    (:class:`~vpr_ros.training.config.OptimConfig`), ``schedule`` and ``run`` sections, plus whatever
    the hooks read; it is saved as ``run.dir/config.yaml`` and in the checkpoint.
    """

    method = ""
    loss_terms: tuple[str, ...] = ("loss",)

    def __init__(self, cfg: Any, *, resume: bool = False) -> None:
        self.cfg = cfg
        self.dist = _init_distributed(cfg.run.device)
        try:
            self._setup(resume)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ hooks

    def build_places(self) -> tuple[Any, Any]:
        """(training, validation) data, each with ``name`` and ``summary()``."""
        raise NotImplementedError

    def build_models(self) -> tuple[VprModel, VprModel | None]:
        """(the model being trained, the frozen teacher or None)."""
        raise NotImplementedError

    def build_dataset(self) -> Dataset:
        """Training items by index; ``set_epoch(epoch)`` is called at each epoch start."""
        raise NotImplementedError

    def build_sampler(self) -> Sampler:
        """This process's item order of an epoch (``set_epoch``); its length fixes the steps per epoch."""
        d = self.dist
        return DistributedSampler(
            self.dataset,
            num_replicas=d.world,
            rank=d.rank,
            shuffle=True,
            seed=self.cfg.run.seed,
            drop_last=True,
        )

    def build_objective(self) -> nn.Module:
        """The module whose forward gives the loss parts; it holds the student (and any frozen teacher)."""
        raise NotImplementedError

    def compute_loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """``{"loss": total, ...}`` of one batch; ``self.model`` is the objective (DDP-wrapped if needed)."""
        raise NotImplementedError

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.student.parameters() if p.requires_grad]

    def loader_workers(self) -> int:
        """DataLoader worker processes."""
        return 0

    def start_epoch(self, epoch: int, skip: int) -> None:
        """Before the first batch of ``epoch`` (``skip`` > 0: resuming after that many of its steps)."""

    def after_step(self, end_of_epoch: bool) -> None:
        """After each optimizer step (``self.step`` already counts it)."""

    def validate(self) -> dict[str, float]:
        """Validation metrics (rank 0); the keys are :meth:`val_columns`."""
        return {}

    def val_columns(self) -> list[str]:
        """The ``val.csv`` columns; empty: no validation."""
        return []

    def checkpoint_meta(self) -> dict[str, Any]:
        """Method-specific entries of the checkpoint's ``meta`` (beside method, step and dataset)."""
        return {}

    def checkpoint_extra(self) -> dict[str, Any]:
        """Method-specific top-level checkpoint entries (tensors, numbers, strings: ``weights_only``)."""
        return {}

    def load_extra(self, ckpt: dict[str, Any]) -> None:
        """Restore what :meth:`checkpoint_extra` saved (on resume)."""

    # ------------------------------------------------------------------ set-up

    def _setup(self, resume: bool) -> None:
        cfg, d = self.cfg, self.dist
        self.run_dir = Path(cfg.run.dir)
        self.ckpt_path = self.run_dir / "last.pt"
        resume_ckpt = None
        if resume:
            resume_ckpt = self._read_resume()
        elif self.ckpt_path.exists():
            raise ConfigError(
                f"{self.run_dir} already holds a checkpoint (last.pt); resume it (--resume) or "
                "choose another run.dir"
            )
        self.resuming = resume_ckpt is not None
        torch.manual_seed(cfg.run.seed)
        np.random.seed(cfg.run.seed)
        random.seed(cfg.run.seed)
        self.train_places, self.val_places = self.build_places()
        self.student, self.teacher = self.build_models()
        if resume_ckpt is not None and resume_ckpt["model"]["name"] != self.student.name:
            raise ModelError(
                f"{self.ckpt_path}: holds model {resume_ckpt['model']['name']!r}, the recipe trains "
                f"{self.student.name!r}"
            )
        self.dataset = self.build_dataset()
        self.sampler = self.build_sampler()
        bs = cfg.schedule.batch_size
        self.steps_per_epoch = len(self.sampler) // bs
        if self.steps_per_epoch == 0:
            raise DatasetError(
                f"{self.train_places.name}: {len(self.dataset)} training items cannot fill one "
                f"batch of {bs} on each of {d.world} processes"
            )
        total = cfg.schedule.epochs * self.steps_per_epoch
        self.total_steps = min(total, cfg.schedule.max_steps or total)
        self.objective = self.build_objective().to(d.device)
        params = self.trainable_parameters()
        self.optimizer = make_optimizer(cfg.optim, params)
        s = cfg.schedule
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, LrSchedule(s.scheduler, self.total_steps, s.warmup_steps, s.step_size, s.gamma)
        )
        self.step, self.train_seconds = 0, 0.0
        self.metrics: dict[str, float] = {}
        if resume_ckpt is not None:
            self._load_state(resume_ckpt)
        self.model: nn.Module = self.objective
        if d.world > 1:
            self.model = DistributedDataParallel(
                self.objective,
                device_ids=[d.device.index] if d.device.type == "cuda" else None,
                find_unused_parameters=True,
            )
        self.csv_train = self.csv_val = self.tb = None
        if d.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            for stale in remove_stale_temps(self.ckpt_path):  # checkpoint writes a kill interrupted
                log.info("removed %s (an unfinished checkpoint write)", stale)
            save_recipe(cfg, self.run_dir / "config.yaml")
            keep = self.step if resume_ckpt is not None else None
            self.csv_train = CsvLog(
                self.run_dir / "train.csv",
                ["step", "epoch", "lr", *self.loss_terms, "sec_per_step", "train_seconds"],
                keep_until=keep,
            )
            if self.val_columns():
                columns = ["step", *self.val_columns()]
                self.csv_val = CsvLog(self.run_dir / "val.csv", columns, keep_until=keep)
            self.tb = _tensorboard(self.run_dir, cfg.run.tensorboard)
        log.info(
            "[rank %d/%d] %s %s | %s | %s | %d items, %d steps/epoch, %d steps total, %d trainable "
            "parameters, device %s",
            d.rank,
            d.world,
            self.method,
            self.student.name,
            self.train_places.summary(),
            self.val_places.summary(),
            len(self.dataset),
            self.steps_per_epoch,
            self.total_steps,
            sum(p.numel() for p in params),
            d.device,
        )

    # ------------------------------------------------------------------ checkpoint state

    def _read_resume(self) -> dict[str, Any]:
        if not self.ckpt_path.is_file():
            raise ConfigError(f"cannot resume: {self.ckpt_path} does not exist")
        ckpt = read_checkpoint(self.ckpt_path)
        if ckpt.get("kind") != "training" or "optimizer" not in ckpt:
            raise ModelError(f"{self.ckpt_path}: not a training checkpoint (kind {ckpt.get('kind')!r})")
        return ckpt

    def _load_state(self, ckpt: dict[str, Any]) -> None:
        try:
            self.student.load_state_dict(ckpt["state_dict"], strict=True)
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            self.load_extra(ckpt)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise ModelError(f"{self.ckpt_path}: does not fit this recipe's model/optimizer: {exc}") from None
        self.step = int(ckpt["step"])
        self.train_seconds = float(ckpt.get("train_seconds", 0.0))
        self.metrics = dict(ckpt.get("metrics", {}))
        _set_rng_state(ckpt["rng"])
        log.info(
            "[rank %d/%d] resumed from %s at step %d",
            self.dist.rank,
            self.dist.world,
            self.ckpt_path,
            self.step,
        )

    def save(self, path: Path | None = None) -> Path:
        """Write the training checkpoint atomically (rank 0 only)."""
        path = path or self.ckpt_path
        extra: dict[str, Any] = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": _rng_state(),
            "step": self.step,
            "epoch": self.step // self.steps_per_epoch,
            "total_steps": self.total_steps,
            "train_seconds": self.train_seconds,
            "config": asdict(self.cfg),
            "metrics": dict(self.metrics),
            **self.checkpoint_extra(),
        }
        meta = {
            "method": self.method,
            "step": self.step,
            "total_steps": self.total_steps,
            "dataset": self.train_places.name,
            **self.checkpoint_meta(),
        }
        return save_checkpoint(self.student, path, kind="training", meta=meta, extra=extra)

    # ------------------------------------------------------------------ run

    def _log_step(self, epoch: int, parts: dict[str, float], sec: float) -> None:
        row = {
            "step": self.step,
            "epoch": epoch,
            "lr": self.scheduler.get_last_lr()[0],
            **parts,
            "sec_per_step": sec,
            "train_seconds": self.train_seconds,
        }
        self.csv_train.write(row)
        if self.tb is not None:
            for k, v in parts.items():
                self.tb.add_scalar(f"train/{k}", v, self.step)
            self.tb.add_scalar("train/lr", row["lr"], self.step)

    def _validate_and_log(self) -> None:
        if self.dist.main and self.val_columns():
            t0 = time.perf_counter()
            m = self.validate()
            self.csv_val.write({"step": self.step, **m})
            if self.tb is not None:
                for k, v in m.items():
                    self.tb.add_scalar(f"val/{k}", v, self.step)
            log.info(
                "[rank 0] step %d validation (%.1fs): %s",
                self.step,
                time.perf_counter() - t0,
                "  ".join(f"{k} {100 * v:.1f}" for k, v in m.items()),
            )
            self.objective.train()
        self.dist.barrier()

    def _checkpoint(self) -> None:
        if self.dist.main:
            self.save()
            log.info("[rank 0] step %d checkpoint %s", self.step, self.ckpt_path)
        self.dist.barrier()

    def run(self) -> TrainResult:
        """Train to the final step (from the resume point), validating and checkpointing on schedule."""
        cfg, d, s = self.cfg, self.dist, self.cfg.schedule
        bs = s.batch_size
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc=self.run_dir.name,
            unit="step",
            disable=not (d.main and cfg.run.progress),
            dynamic_ncols=True,
        )
        self.objective.train()
        while self.step < self.total_steps:
            epoch, skip = divmod(self.step, self.steps_per_epoch)
            self.sampler.set_epoch(epoch)
            self.dataset.set_epoch(epoch)
            self.start_epoch(epoch, skip)
            loader = DataLoader(
                self.dataset,
                batch_size=bs,
                sampler=_SkipSampler(self.sampler, skip * bs),
                num_workers=self.loader_workers(),
                drop_last=True,
            )
            for batch in loader:
                t0 = time.perf_counter()
                out = self.compute_loss(batch)
                self.optimizer.zero_grad(set_to_none=True)
                out["loss"].backward()
                if cfg.optim.grad_clip > 0:
                    params = self.optimizer.param_groups[0]["params"]
                    torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
                self.optimizer.step()
                self.scheduler.step()
                self.step += 1
                sec = time.perf_counter() - t0
                self.train_seconds += sec
                parts = {k: float(v.detach()) for k, v in out.items()}
                bar.update(1)
                bar.set_postfix({k: f"{v:.4f}" for k, v in parts.items()}, refresh=False)
                if d.main and (self.step % s.log_every == 0 or self.step == self.total_steps):
                    self._log_step(epoch, parts, sec)
                if self.step % s.log_every == 0 and d.world > 1:
                    log.info("[rank %d/%d] step %d loss %.4f", d.rank, d.world, self.step, parts["loss"])
                end_of_epoch = self.step % self.steps_per_epoch == 0
                self.after_step(end_of_epoch)
                if (
                    (s.val_every and self.step % s.val_every == 0)
                    or (not s.val_every and end_of_epoch)
                    or self.step == self.total_steps
                ):
                    self._validate_and_log()
                if self.step % s.ckpt_every == 0 or self.step == self.total_steps:
                    self._checkpoint()
                if self.step >= self.total_steps or end_of_epoch:
                    break
        bar.close()
        result = TrainResult(
            self.run_dir,
            self.ckpt_path,
            self.step,
            math.ceil(self.step / self.steps_per_epoch),
            self.train_seconds,
            dict(self.metrics),
        )
        if d.main:
            summary = {
                "steps": result.steps,
                "epochs": result.epochs,
                "train_seconds": result.train_seconds,
                "metrics": result.metrics,
                "checkpoint": str(result.checkpoint),
                "world_size": d.world,
                "train_places": self.train_places.summary(),
                "val_places": self.val_places.summary(),
                **self.checkpoint_meta(),
            }
            text = json.dumps(summary, indent=2, default=str) + "\n"
            atomic_write_text(self.run_dir / "summary.json", text)
            if self.tb is not None:
                self.tb.close()
        log.info(
            "[rank %d/%d] finished: %d steps, %.1f s training",
            d.rank,
            d.world,
            result.steps,
            result.train_seconds,
        )
        return result

    def close(self) -> None:
        if self.dist.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def run_trainer(trainer_cls: type[Trainer], *args: Any, **kwargs: Any) -> TrainResult:
    """Build ``trainer_cls(*args, **kwargs)``, run it to the final step and release its process group."""
    trainer = trainer_cls(*args, **kwargs)
    try:
        return trainer.run()
    finally:
        trainer.close()


# --------------------------------------------------------------------------- the place-recognition stage


class PlaceTrainer(Trainer):
    """A stage on labelled places: ``cfg.data`` split by place (:class:`~vpr_ros.training.config.DataConfig`),
    :class:`~vpr_ros.training.data.TupleDataset` tuples whose student input is degraded by
    ``cfg.degradation``, hard negatives from a cache of the student's descriptors (``data.mining: hard``,
    refreshed at each epoch start and every ``data.cache_every`` steps, kept in the checkpoint), and
    recall@N validation of degraded queries against the high-quality database. A method still gives
    :meth:`build_models`, :meth:`build_objective` and :meth:`compute_loss`."""

    def __init__(self, cfg: Any, *, resume: bool = False) -> None:
        self.degrader = Degrader(cfg.degradation.specs)
        self.val_queries: list[np.ndarray] | None = None
        super().__init__(cfg, resume=resume)

    def build_places(self) -> tuple[PlaceDataset, PlaceDataset]:
        d = self.cfg.data
        train_p, val_p = build_places(d).split_by_place(d.split)
        return (
            train_p.with_positive_queries(d.max_train_queries),
            val_p.with_positive_queries(d.max_val_queries),
        )

    def build_dataset(self) -> Dataset:
        cfg = self.cfg
        return TupleDataset(
            self.train_places,
            preprocess=self.student.preprocess,
            degrader=self.degrader,
            negatives=cfg.data.negatives,
            targets=cfg.degradation.targets,
            seed=cfg.run.seed,
            pool=cfg.data.mining_pool,
        )

    def loader_workers(self) -> int:
        return self.cfg.data.workers

    @property
    def mining(self) -> bool:
        return self.cfg.data.mining == "hard"

    def start_epoch(self, epoch: int, skip: int) -> None:
        if self.mining and (skip == 0 or self.dataset.db_desc is None):
            self.refresh_cache()
            self.objective.train()

    def after_step(self, end_of_epoch: bool) -> None:
        every = self.cfg.data.cache_every
        if self.mining and every and self.step % every == 0 and not end_of_epoch:
            self.refresh_cache()
            self.objective.train()

    def refresh_cache(self) -> None:
        """Descriptors of all training queries and database images (high quality) for hard mining."""
        p: PlaceDataset = self.train_places
        bs, dev, images = self.cfg.run.val_batch_size, self.dist.device, self.dataset.cache
        q = describe(self.student, [images.get(r) for r in p.queries], device=dev, batch_size=bs)
        db = (
            q
            if p.database is p.queries
            else describe(self.student, [images.get(r) for r in p.database], device=dev, batch_size=bs)
        )
        self.dataset.set_cache(q, db)

    def validation_model(self) -> VprModel:
        """The model whose descriptors validation ranks (default: the student)."""
        return self.student

    def validate(self) -> dict[str, float]:
        """Recall@N on the validation places (rank 0); degraded queries, high-quality database."""
        cfg = self.cfg
        if self.val_queries is None:
            self.val_queries = degrade_queries(self.val_places, self.degrader, seed=cfg.run.seed)
        ns = cfg.run.recall_ns
        rec, _ = evaluate_model(
            self.validation_model(),
            self.val_places,
            self.val_queries,
            device=self.dist.device,
            batch_size=cfg.run.val_batch_size,
            ns=ns,
        )
        self.metrics = {f"R@{n}": float(rec[n]) for n in ns}
        return self.metrics

    def val_columns(self) -> list[str]:
        return [f"R@{n}" for n in self.cfg.run.recall_ns]

    def checkpoint_meta(self) -> dict[str, Any]:
        return {"degradation": self.degrader.label}

    def checkpoint_extra(self) -> dict[str, Any]:
        q, db = getattr(self.dataset, "q_desc", None), getattr(self.dataset, "db_desc", None)
        if q is None or db is None:
            return {}
        return {"mining_cache": {"q": torch.from_numpy(q), "db": torch.from_numpy(db)}}

    def load_extra(self, ckpt: dict[str, Any]) -> None:
        cache = ckpt.get("mining_cache")
        if cache is not None:
            self.dataset.set_cache(cache["q"].numpy(), cache["db"].numpy())
