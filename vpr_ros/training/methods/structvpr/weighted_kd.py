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

Stage II (Eq. 5-6) trains the RGB student on triplets (q, p, n) with

    L(q, p, n) = L_vpr(x^D) + sum over I in {q, p, n} of phi(q, p) * || x^S_I - T(x^D_I) ||^2

in the paper's letters: x^D the student's descriptor (448-d), x^S the frozen Stage-I seg-branch's
descriptor of the image's SLME map (480-d), T a linear map learnt with the student that embeds x^D in
the seg-branch's space (448 -> 480), L_vpr the triplet margin loss of Eq. 3 (L2 distances). A tuple
(q, p, n_1..n_k) holds k triplets; its loss is the mean of Eq. 6 over them (k = 1: Eq. 6 itself).
T starts at PyTorch's default initialisation; ``t_init: ridge`` (not in the paper) starts it at the
ridge least-squares map of the starting student's descriptors onto the seg-branch's. Only the student
is exported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from vpr_ros.training.methods.structvpr.partition import GROUPS, MODES, RANKS, Pairs, group_of, keep_mask

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


def triplet_eq3(
    query: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor, margin: float
) -> torch.Tensor:
    """Eq. 3 of each triplet (q, p, n_j): ``max(d(q, p) - d(q, n_j) + m, 0)`` with d the L2 distance;
    query / positive (B, D), negatives (B, k, D) -> (B, k)."""
    d_pos = (query - positive).norm(dim=-1, keepdim=True)
    d_neg = (query[:, None, :] - negatives).norm(dim=-1)
    return torch.relu(d_pos - d_neg + margin)


def weighted_kd_loss(seg: torch.Tensor, student_t: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The distillation part of Eq. 6 per tuple, ``phi * sum over I in {q, p, n} of ||x^S_I - T(x^D_I)||^2``
    (with k negatives: the mean of that sum over the k triplets), averaged over the batch. ``seg``: the
    seg-branch's descriptors x^S, ``student_t``: T(x^D), both (B, 2 + k, D); ``weights``: phi, (B,)."""
    if seg.shape != student_t.shape or weights.shape != seg.shape[:1] or seg.shape[1] < 3:
        raise ValueError(
            f"expected (B, 2 + k, D) descriptors and (B,) weights, got {tuple(seg.shape)}, "
            f"{tuple(student_t.shape)}, {tuple(weights.shape)}"
        )
    sq = (seg - student_t).pow(2).sum(-1)  # (B, 2 + k): ||x^S_I - T(x^D_I)||^2 per image
    per_tuple = sq[:, 0] + sq[:, 1] + sq[:, 2:].mean(1)
    return (weights * per_tuple).mean()


class StructVPRDistill(nn.Module):
    """Stage II: RGB student (trained), seg-branch (frozen), T (trained); ``forward`` gives the loss terms.

    ``rgb``: (B, 2 + k, 3, H, W) student input; ``slme``: (B, 2 + k, C, h, w) SLME maps of the same
    images; ``weight``: (B,) phi of each tuple's (q, p). Returns ``{"loss", "triplet", "kd"}`` with
    ``loss = triplet + kd_weight * kd`` (``kd_weight`` 1: Eq. 6; 0: no distillation).
    """

    def __init__(
        self, student: nn.Module, teacher: nn.Module, *, kd_weight: float = 1.0, margin: float = 0.1
    ) -> None:
        super().__init__()
        self.student = student
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.proj = nn.Linear(int(student.descriptor_dim), int(teacher.descriptor_dim))  # T: x^D -> x^S
        self.kd_weight = float(kd_weight)
        self.margin = float(margin)

    def train(self, mode: bool = True) -> StructVPRDistill:
        super().train(mode)
        self.teacher.eval()  # frozen: BatchNorm keeps its statistics
        return self

    def forward(self, rgb: torch.Tensor, slme: torch.Tensor, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        b, t = rgb.shape[:2]
        s = self.student(rgb.flatten(0, 1)).view(b, t, -1)
        parts = {"triplet": triplet_eq3(s[:, 0], s[:, 1], s[:, 2:], self.margin).mean()}
        if self.kd_weight > 0:
            with torch.no_grad():
                x_seg = self.teacher(slme.flatten(0, 1)).view(b, t, -1)
            parts["kd"] = weighted_kd_loss(x_seg, self.proj(s), weight.to(s.dtype))
        total = parts["triplet"] + self.kd_weight * parts.get("kd", 0.0)
        return {"loss": total, **parts}


@torch.no_grad()
def init_projection(proj: nn.Linear, source: np.ndarray, target: np.ndarray, ridge: float = 1e-2) -> float:
    """Set T (``proj``) to the ridge least-squares map ``source -> target`` (rows: the same images);
    returns the remaining mean squared error. The ``t_init: ridge`` option: source the starting
    student's descriptors, target the seg-branch's."""
    d = np.hstack([source, np.ones((len(source), 1), source.dtype)]).astype(np.float64)
    reg = ridge * np.eye(d.shape[1])
    reg[-1, -1] = 0.0  # the bias is not shrunk
    w = np.linalg.solve(d.T @ d + reg, d.T @ target.astype(np.float64))
    proj.weight.copy_(torch.from_numpy(w[:-1].T).to(proj.weight.dtype))
    proj.bias.copy_(torch.from_numpy(w[-1]).to(proj.bias.dtype))
    return float(((d @ w - target) ** 2).sum(1).mean())


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
    "triplet_eq3",
    "weighted_kd_loss",
)
