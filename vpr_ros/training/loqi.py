"""LoQI-VPR: distillation for visual place recognition on low-quality images.

Yang, Jin, Huang, Wang, Rizzo, Feng, "Distillation Improves Visual Place Recognition for Low Quality
Images" (arXiv 2310.06906). Two branches of the same architecture:

* teacher f_t, frozen, sees the high-quality image I^h;
* student f_s, initialised from the teacher, sees the low-quality image I^l (the transmitted frame);

trained with  L = L_ickd(f_s(I^l), f_t(I^h)) + alpha * L_mse + beta * L_triplet  (paper eq. for
L_theta1 + alpha L_theta2 + beta L_theta3), where L_ickd compares the inter-channel correlations of every
latent map, L_mse the global descriptors, and L_triplet ranks the student's low-quality descriptors
(query, best positive, negatives). Each term is switchable, so every row of the paper's ablation trains.

Model-agnostic: any registered :class:`~vpr_ros.core.models.VprModel` whose ``forward_features``
returns its latent maps (StructVPR's three stages, GeM/NetVLAD's last stage). Only the student is
deployed; the teacher is a training-time device.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import torch
from torch import nn

from ..core.errors import ConfigError, ModelError
from ..core.models import create_model, model_from_checkpoint, read_checkpoint
from ..core.models.registry import VprModel
from .config import LossConfig, ModelConfig
from .losses import ickd_loss, mse_loss, triplet_loss


def forward_outputs(
    model: VprModel, x: torch.Tensor, *, maps: bool, desc: bool
) -> tuple[list[torch.Tensor] | None, torch.Tensor | None]:
    """Latent maps and/or global descriptor of a batch, in one pass when the model can aggregate its
    own maps (``model.aggregate``, e.g. StructVPR), else by ``forward_features`` and ``forward``."""
    if maps and desc and callable(getattr(model, "aggregate", None)):
        fmaps = model.forward_features(x)
        return fmaps, model.aggregate(fmaps)
    return (model.forward_features(x) if maps else None), (model(x) if desc else None)


class LoQI(nn.Module):
    """Student + frozen teacher; ``forward(hq, lq)`` returns the loss terms of one batch of tuples.

    ``hq`` / ``lq``: (B, T, 3, H, W) tuples (query, positive, negatives...) as the teacher / student
    see them. Returns ``{"loss": total, "ickd": ..., "mse": ..., "triplet": ...}`` (enabled terms only).
    """

    def __init__(self, student: VprModel, teacher: VprModel | None, loss: LossConfig) -> None:
        super().__init__()
        if (loss.ickd or loss.mse) and teacher is None:
            raise ConfigError("loss.ickd / loss.mse need a teacher (model.teacher)")
        self.student = student
        self.teacher = teacher
        self.cfg = loss
        if teacher is not None:
            teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> LoQI:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # frozen: BatchNorm keeps its statistics
        return self

    def _select(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        idx = self.cfg.ickd_maps
        return maps if idx is None else [maps[i] for i in idx]

    def forward(self, hq: torch.Tensor, lq: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        b, t = lq.shape[:2]
        s_maps, s_desc = forward_outputs(
            self.student, lq.flatten(0, 1), maps=cfg.ickd, desc=cfg.mse or cfg.triplet
        )
        parts: dict[str, torch.Tensor] = {}
        if cfg.ickd or cfg.mse:
            assert self.teacher is not None
            with torch.no_grad():
                t_maps, t_desc = forward_outputs(self.teacher, hq.flatten(0, 1), maps=cfg.ickd, desc=cfg.mse)
            if cfg.ickd:
                parts["ickd"] = ickd_loss(self._select(s_maps), self._select(t_maps))
            if cfg.mse:
                parts["mse"] = mse_loss(s_desc, t_desc)
        if cfg.triplet:
            if t < 3:
                raise ValueError(f"the triplet loss needs tuples of query, positive and negatives, got T={t}")
            d = s_desc.view(b, t, -1)
            parts["triplet"] = triplet_loss(d[:, 0], d[:, 1], d[:, 2:], cfg.margin)
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
