"""The training loop: one place-recognition method on a place split, with logging, validation, atomic
checkpoints, resume and DDP.

:class:`Trainer` is the loop; a method plugs in through its public hooks (data, models, objective,
parameters, validation, checkpoint contents), and its defaults are LoQI's. SciceVPR
(:class:`~vpr_ros.training.methods.scicevpr.SciceTrainer`) and StructVPR's stages
(:mod:`vpr_ros.training.methods.structvpr.pipeline`) are subclasses. Public helpers for methods:
:func:`make_optimizer`, :class:`LrSchedule`, :class:`CsvLog`, :func:`run_trainer`, and
:func:`~vpr_ros.training.config.build_config` for their recipe dataclasses.

:func:`train` runs one LoQI recipe (:class:`~vpr_ros.training.config.TrainConfig`) to its final step:

* everything that can be wrong (data, split, models, teacher/checkpoint of another model, resume state)
  fails with a clear error before the first step;
* tqdm progress, ``train.csv`` / ``val.csv`` logs and TensorBoard (when installed) in ``run.dir``;
* validation recall@N on the held-out places with degraded queries against the high-quality database,
  described by the student itself (``R@N``, what a deployed model does) and by the teacher
  (``teacher_db/R@N``, the paper's protocol);
* ``last.pt``: a self-describing ``kind="training"`` checkpoint (student weights, optimizer, scheduler,
  python/numpy/torch RNG states, step, epoch, config, hard-mining cache) written atomically every
  ``schedule.ckpt_every`` steps; ``train(cfg, resume=True)`` continues from it after a kill and stops at
  the same final step (data order and degradations depend only on seed, epoch and index);
* DistributedDataParallel when started by ``torchrun`` (gloo on CPU, nccl on GPU; DistributedSampler;
  ``schedule.batch_size`` is per process; only rank 0 validates and writes).
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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from vpr_ros.core.errors import ConfigError, DatasetError, ModelError
from vpr_ros.core.fileio import atomic_write_text, remove_stale_temps
from vpr_ros.core.models import read_checkpoint, save_checkpoint, select_device
from vpr_ros.core.models.registry import VprModel
from vpr_ros.data.places import PlaceDataset
from vpr_ros.training.config import OptimConfig, TrainConfig
from vpr_ros.training.data import (
    Degrader,
    TupleDataset,
    build_places,
    degrade_queries,
)
from vpr_ros.training.evaluate import describe, evaluate_model
from vpr_ros.training.methods.loqi import LoQI, build_branches

log = logging.getLogger("vpr_ros.training")

LOSS_TERMS = ("loss", "ickd", "mse", "triplet")


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
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard not installed: CSV logs only
        log.info("tensorboard is not installed; logging to CSV only")
        return None
    return SummaryWriter(log_dir=str(run_dir / "tb"))


# --------------------------------------------------------------------------- the loop


class Trainer:
    """One run of a recipe: the loop, logs, validation, atomic checkpoints, resume and DDP.

    :func:`train` is the usual entry point. The method is plugged in through the hooks below; the
    defaults are LoQI's, so ``Trainer`` itself trains LoQI (:class:`~vpr_ros.training.methods.loqi.LoQI`).
    A method subclasses ``Trainer`` and overrides only what differs (SciceVPR's place batches and
    multi-similarity objective, StructVPR's stages); the loop itself is never copied.

    ===============================  =============================================================
    hook                             LoQI default
    ===============================  =============================================================
    :meth:`build_places`             ``data`` source, split by place -> (train, validation)
    :meth:`build_models`             (student, frozen teacher) from ``model``
    :meth:`build_dataset`            :class:`~vpr_ros.training.data.TupleDataset` (hq / lq tuples)
    :meth:`build_sampler`            ``DistributedSampler`` (this process's share, seeded per epoch)
    :meth:`build_objective`          the module whose forward gives the loss parts (``LoQI``)
    :meth:`trainable_parameters`     the student's parameters that require gradients
    :meth:`compute_loss`             batch -> ``{"loss": total, part: value, ...}``
    :meth:`refresh_cache`            hard-mining descriptors (``data.mining: hard``)
    :meth:`validate`                 recall@N on the validation places (``{}``: none)
    :meth:`checkpoint_meta`,         what the checkpoint says about the run / carries besides the
    :meth:`checkpoint_extra`,        student weights, and how a resume restores it
    :meth:`load_extra`
    ===============================  =============================================================

    Class attributes: ``method`` (the checkpoint's ``meta["method"]``) and ``loss_terms`` (the
    ``train.csv`` columns); :meth:`val_columns` (the ``val.csv`` columns, empty: no validation).
    ``cfg`` is a :class:`~vpr_ros.training.config.TrainConfig` or a method recipe with the same
    ``data``, ``degradation``, ``optim``, ``schedule`` and ``run`` sections, a ``model.name``,
    ``to_dict()`` and ``save()``.
    """

    method = "loqi"
    loss_terms: tuple[str, ...] = LOSS_TERMS

    def __init__(self, cfg: TrainConfig, *, resume: bool = False) -> None:
        self.cfg = cfg
        self.dist = _init_distributed(cfg.run.device)
        try:
            self._setup(resume)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ hooks (LoQI's by default)

    def build_places(self) -> tuple[PlaceDataset, PlaceDataset]:
        """(training, validation) places; errors about data come before any model is built."""
        cfg = self.cfg
        train_p, val_p = build_places(cfg.data).split_by_place(cfg.data.split)
        return (
            train_p.with_positive_queries(cfg.data.max_train_queries),
            val_p.with_positive_queries(cfg.data.max_val_queries),
        )

    def build_models(self) -> tuple[VprModel, VprModel | None]:
        """(the model being trained, the frozen teacher or None)."""
        return build_branches(self.cfg.model)

    def build_dataset(self) -> Dataset:
        """Training items by index; ``set_epoch(epoch)`` is called at each epoch start."""
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

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.student.parameters() if p.requires_grad]

    def compute_loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """``{"loss": total, ...}`` of one batch; ``self.model`` is the objective (DDP-wrapped if needed)."""
        dev = self.dist.device
        hq, lq = batch["hq"].to(dev, non_blocking=True), batch["lq"].to(dev, non_blocking=True)
        if getattr(self.objective, "teacher_cache", None) is not None:
            return self.model(hq, lq, batch["ids"])
        return self.model(hq, lq)

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

    def validate(self) -> dict[str, float]:
        """Recall@N on the validation places (rank 0); degraded queries, high-quality database."""
        cfg, dev = self.cfg, self.dist.device
        if self.val_queries is None:
            self.val_queries = degrade_queries(self.val_places, self.degrader, seed=cfg.run.seed)
        bs, ns = cfg.run.val_batch_size, cfg.run.recall_ns
        rec, _ = evaluate_model(
            self.student, self.val_places, self.val_queries, device=dev, batch_size=bs, ns=ns
        )
        metrics = {f"R@{n}": float(rec[n]) for n in ns}
        if self.teacher is not None:
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
        ns = self.cfg.run.recall_ns
        return [*(f"R@{n}" for n in ns), *(f"teacher_db/R@{n}" for n in ns)]

    def checkpoint_meta(self) -> dict[str, Any]:
        """Method-specific entries of the checkpoint's ``meta`` (beside method, step, data, degradation)."""
        return {"teacher": self.cfg.model.teacher}

    def checkpoint_extra(self) -> dict[str, Any]:
        """Method-specific top-level checkpoint entries (tensors, numbers, strings: ``weights_only``)."""
        q, db = getattr(self.dataset, "q_desc", None), getattr(self.dataset, "db_desc", None)
        if q is None or db is None:
            return {}
        return {"mining_cache": {"q": torch.from_numpy(q), "db": torch.from_numpy(db)}}

    def load_extra(self, ckpt: dict[str, Any]) -> None:
        """Restore what :meth:`checkpoint_extra` saved (on resume)."""
        cache = ckpt.get("mining_cache")
        if cache is not None:
            self.dataset.set_cache(cache["q"].numpy(), cache["db"].numpy())

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
        self.degrader = Degrader(cfg.degradation.specs)
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
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.model = DDP(
                self.objective,
                device_ids=[d.device.index] if d.device.type == "cuda" else None,
                find_unused_parameters=True,
            )
        self.val_queries: list[np.ndarray] | None = None
        self.teacher_db: np.ndarray | None = None
        self.csv_train = self.csv_val = self.tb = None
        if d.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            for stale in remove_stale_temps(self.ckpt_path):  # checkpoint writes a kill interrupted
                log.info("removed %s (an unfinished checkpoint write)", stale)
            cfg.save(self.run_dir / "config.yaml")
            keep = self.step if resume_ckpt is not None else None
            self.csv_train = CsvLog(
                self.run_dir / "train.csv",
                ["step", "epoch", "lr", *self.loss_terms, "sec_per_step", "train_seconds"],
                keep_until=keep,
            )
            if self.val_columns():
                self.csv_val = CsvLog(
                    self.run_dir / "val.csv", ["step", *self.val_columns()], keep_until=keep
                )
            self.tb = _tensorboard(self.run_dir, cfg.run.tensorboard)
        log.info(
            "[rank %d/%d] %s %s | %s | %s | %d items, %d steps/epoch, %d steps total, %d trainable "
            "parameters, device %s",
            d.rank,
            d.world,
            self.method,
            cfg.model.name,
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
        if ckpt["model"]["name"] != self.cfg.model.name:
            raise ModelError(
                f"{self.ckpt_path}: holds model {ckpt['model']['name']!r}, the recipe trains "
                f"{self.cfg.model.name!r}"
            )
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
            "config": self.cfg.to_dict(),
            "metrics": dict(self.metrics),
            **self.checkpoint_extra(),
        }
        meta = {
            "method": self.method,
            "step": self.step,
            "total_steps": self.total_steps,
            "degradation": self.degrader.label,
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
            if cfg.data.mining == "hard" and (skip == 0 or self.dataset.db_desc is None):
                self.refresh_cache()
                self.objective.train()
            loader = DataLoader(
                self.dataset,
                batch_size=bs,
                sampler=_SkipSampler(self.sampler, skip * bs),
                num_workers=cfg.data.workers,
                drop_last=True,
            )
            for batch in loader:
                t0 = time.perf_counter()
                out = self.compute_loss(batch)
                self.optimizer.zero_grad(set_to_none=True)
                out["loss"].backward()
                if cfg.optim.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(
                        self.optimizer.param_groups[0]["params"], cfg.optim.grad_clip
                    )
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
                if (
                    cfg.data.mining == "hard"
                    and cfg.data.cache_every
                    and self.step % cfg.data.cache_every == 0
                    and not end_of_epoch
                ):
                    self.refresh_cache()
                    self.objective.train()
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
                "degradation": self.degrader.label,
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


def train(cfg: TrainConfig, *, resume: bool = False) -> TrainResult:
    """Run (or, with ``resume``, continue) a recipe to its final step; see the module docstring."""
    return run_trainer(Trainer, cfg, resume=resume)
