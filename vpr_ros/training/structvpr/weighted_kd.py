"""Weighted knowledge distillation (StructVPR Sec. 3.5, Stage II).

Every training pair (q, p) gets a weight phi(q, p) from its ranks (x: seg-branch, y: rgb-branch; 1 =
first of q's recall list) and its group (:mod:`.partition`), Eq. 4:

    D1 (x <= N_t < y):  phi = 1 + (min(N_m, y) - x) / (4 ln(1 + x))
    D2 (x <= y <= N_t): phi = 1 + (y - x) / (5 ln(1 + x))
    D3 (y < x <= N_t):  phi = 1 + (y - x) / (4 ln(1 + x))
    D4 (x > N_t):       phi = 0

so a pair weighs more the better the seg-branch ranks p (small x) and the worse the rgb-branch does
(large y, counted up to N_m = 20 in D1): with N_t = 10 D1 spans (1.10, 7.85], D2 [1, 3.60], D3
[0.06, 1). The ablation (Sec. 4.4) adds phi' of Eq. 7 for GP-S (``1 + 1 / (4 ln(1 + x))`` on S1), one
constant weight per group (8-4-1-0 for D1..D4) and weight 1 on the kept pairs (selective KD; ``all``:
every pair, non-selective).

The Stage II loss of one tuple (q, p, n_1..n_k) is the student's triplet loss plus

    L_kd = phi(q, p) * mean over the tuple's images i of || x^S_i - T(x^D_i) ||^2

with x^S the RGB student's descriptor, x^D the frozen seg-branch's descriptor of the image's SLME map,
and T a learnt linear map (480 -> 448). Only the student is exported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..losses import triplet_loss
from .partition import GROUPS, MODES, RANKS, Pairs, group_of, keep_mask

WEIGHTINGS = ("phi", "phi-prime", "constant", "ones")


def _ranks(x: np.ndarray | int, y: np.ndarray | int) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if (x < 1).any() or (y < 1).any():
        raise ValueError("ranks x, y count from 1 (the first of the recall list)")
    return x, y


def phi(x: np.ndarray | int, y: np.ndarray | int, n_t: int = 10, n_m: int = 20) -> np.ndarray:
    """Eq. 4 by group of (x, y) (:func:`~.partition.group_of`)::

    D1: 1 + (min(N_m, y) - x) / (4 ln(1 + x))
    D2: 1 + (y - x) / (5 ln(1 + x))
    D3: 1 + (y - x) / (4 ln(1 + x))
    D4: 0
    """
    x, y = _ranks(x, y)
    g = group_of(x, y, n_t)
    ln = np.log1p(x)
    d1 = 1.0 + (np.minimum(n_m, y) - x) / (4.0 * ln)
    d2 = 1.0 + (y - x) / (5.0 * ln)
    d3 = 1.0 + (y - x) / (4.0 * ln)
    return np.select([g == 0, g == 1, g == 2], [d1, d2, d3], default=0.0)


def phi_prime(x: np.ndarray | int, n_t: int = 10) -> np.ndarray:
    """Eq. 7, phi' of the GP-S ablation (only the seg-branch's rank x = RN_s):
    ``1 + 1 / (4 ln(1 + x))`` in S1 (``x <= N_t``), 0 in S2."""
    x, _ = _ranks(x, 1)
    return np.where(x <= n_t, 1.0 + 1.0 / (4.0 * np.log1p(x)), 0.0)


@dataclass
class WeightingConfig:
    """How Stage II weighs each pair: ``partition`` (gp-d | gp-s | gp-r | all) decides which pairs are
    distilled; ``weighting`` phi (Eq. 4) | phi-prime (Eq. 7, GP-S's) | constant (``constant`` per group
    D1..D4) | ones; ``rank`` how
    x and y are counted (:data:`~.partition.RANKS`: ``list``, the paper's, or ``wrong-only``)."""

    partition: str = "gp-d"
    weighting: str = "phi"
    n_t: int = 10
    n_m: int = 20
    rank: str = "list"
    constant: list[float] = field(default_factory=lambda: [8.0, 4.0, 1.0, 0.0])


def pair_weights(pairs: Pairs, cfg: WeightingConfig) -> np.ndarray:
    """The distillation weight of every pair (0 for pairs the partition drops)."""
    if cfg.partition not in MODES:
        raise ValueError(f"unknown partition {cfg.partition!r}; expected one of {MODES}")
    if cfg.rank not in RANKS:
        raise ValueError(f"unknown rank {cfg.rank!r}; expected one of {RANKS}")
    if cfg.weighting == "phi":
        w = phi(pairs.x, pairs.y, cfg.n_t, cfg.n_m)
    elif cfg.weighting == "phi-prime":
        w = phi_prime(pairs.x, cfg.n_t)
    elif cfg.weighting == "constant":
        if len(cfg.constant) != len(GROUPS):
            raise ValueError(f"constant weights: one per group {GROUPS}, got {cfg.constant}")
        w = np.asarray(cfg.constant, dtype=np.float64)[group_of(pairs.x, pairs.y, cfg.n_t)]
    elif cfg.weighting == "ones":
        w = np.ones(len(pairs), dtype=np.float64)
    else:
        raise ValueError(f"unknown weighting {cfg.weighting!r}; expected one of {WEIGHTINGS}")
    return np.where(keep_mask(pairs.x, pairs.y, cfg.partition, cfg.n_t), w, 0.0)


class PairWeights:
    """Lookup (query index, positive index) -> weight; pairs never ranked weigh ``default``."""

    def __init__(self, pairs: Pairs, weights: np.ndarray, default: float = 0.0) -> None:
        self.table = {(int(q), int(p)): float(w) for q, p, w in zip(pairs.q, pairs.p, weights, strict=True)}
        self.default = default

    def __call__(self, q: int, p: int) -> float:
        return self.table.get((int(q), int(p)), self.default)


def weighted_kd_loss(
    student: torch.Tensor, teacher_proj: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """phi-weighted squared L2 distance: student / projected teacher (B, T, D), weights (B,)."""
    if student.shape != teacher_proj.shape or weights.shape != student.shape[:1]:
        raise ValueError(
            f"expected (B, T, D) descriptors and (B,) weights, got {tuple(student.shape)}, "
            f"{tuple(teacher_proj.shape)}, {tuple(weights.shape)}"
        )
    per_tuple = (student - teacher_proj).pow(2).sum(-1).mean(1)  # (B,)
    return (weights * per_tuple).mean()


class StructVPRDistill(nn.Module):
    """Stage II: RGB student (trained), seg-branch (frozen), T (trained); ``forward`` gives the loss terms.

    ``rgb``: (B, T, 3, H, W) student input; ``slme``: (B, T, C, h, w) SLME maps of the same images;
    ``weight``: (B,) phi of each tuple's (q, p). Returns ``{"loss", "triplet", "kd"}``.
    """

    def __init__(
        self, student: nn.Module, teacher: nn.Module, *, kd_weight: float = 1.0, margin: float = 0.1
    ) -> None:
        super().__init__()
        self.student = student
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.proj = nn.Linear(int(teacher.descriptor_dim), int(student.descriptor_dim))
        self.kd_weight = float(kd_weight)
        self.margin = float(margin)

    def train(self, mode: bool = True) -> StructVPRDistill:
        super().train(mode)
        self.teacher.eval()  # frozen: BatchNorm keeps its statistics
        return self

    def forward(self, rgb: torch.Tensor, slme: torch.Tensor, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        b, t = rgb.shape[:2]
        s = self.student(rgb.flatten(0, 1)).view(b, t, -1)
        parts = {"triplet": triplet_loss(s[:, 0], s[:, 1], s[:, 2:], self.margin)}
        if self.kd_weight > 0:
            with torch.no_grad():
                d = self.teacher(slme.flatten(0, 1)).view(b, t, -1)
            parts["kd"] = weighted_kd_loss(s, self.proj(d), weight.to(s.dtype))
        total = parts["triplet"] + self.kd_weight * parts.get("kd", 0.0)
        return {"loss": total, **parts}


@torch.no_grad()
def init_projection(
    proj: nn.Linear, teacher_desc: np.ndarray, student_desc: np.ndarray, ridge: float = 1e-2
) -> float:
    """Start T at the ridge least-squares map teacher -> student descriptors of the training images (so
    that Stage II begins from what structure already predicts, not from a random target); returns the
    remaining mean squared error."""
    d = np.hstack([teacher_desc, np.ones((len(teacher_desc), 1), teacher_desc.dtype)]).astype(np.float64)
    reg = ridge * np.eye(d.shape[1])
    reg[-1, -1] = 0.0  # the bias is not shrunk
    w = np.linalg.solve(d.T @ d + reg, d.T @ student_desc.astype(np.float64))
    proj.weight.copy_(torch.from_numpy(w[:-1].T).to(proj.weight.dtype))
    proj.bias.copy_(torch.from_numpy(w[-1]).to(proj.bias.dtype))
    return float(((d @ w - student_desc) ** 2).sum(1).mean())


def summarize_weights(pairs: Pairs, weights: np.ndarray, n_t: int = 10) -> dict[str, float]:
    """Mean weight per group and the share of pairs with a non-zero weight (for logs)."""
    g = group_of(pairs.x, pairs.y, n_t)
    out = {
        f"mean_w_{name}": float(weights[g == i].mean()) if (g == i).any() else 0.0
        for i, name in enumerate(GROUPS)
    }
    out["distilled_share"] = float((weights > 0).mean()) if len(weights) else 0.0
    return out


__all__: Sequence[str] = (
    "PairWeights",
    "StructVPRDistill",
    "WeightingConfig",
    "pair_weights",
    "phi",
    "phi_prime",
    "summarize_weights",
    "weighted_kd_loss",
)
