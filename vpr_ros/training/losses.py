"""The three LoQI losses (Yang et al., "Distillation Improves Visual Place Recognition for Low Quality
Images", arXiv 2310.06906), as plain functions of tensors.

* :func:`ickd_loss` -- inter-channel correlation knowledge distillation (Liu et al., ICCV 2021) on
  latent maps (LoQI: the latent code z, the encoder's output): for a map F (C x HW) the C x C
  correlation G = F F^T, each row L2-normalised as in the ICKD reference implementation; the loss is
  ||G_t - G_s||_F^2 / C, averaged over the batch and over the maps. It is 0 for identical maps and
  invariant to a positive rescaling of either map and to any permutation of the spatial positions (it
  compares channel relations, not pixels), so student and teacher maps may even differ in spatial size.
  Maps with fewer positions than channels are compared through the factors of the C x C matrices
  (:class:`Correlation`), the same value without building them.
* :func:`mse_loss` -- mean squared error between student and teacher global descriptors: by default the
  mean over every element (batch x dimensions), as "MSE" reads and ``torch.nn.MSELoss`` computes;
  ``reduction="sum"`` sums over the dimensions and averages over the batch (``2 - 2 cos`` for
  L2-normalised descriptors: SciceVPR's L_D as its authors' code computes it).
* :func:`triplet_loss` -- the triplet margin ranking loss on descriptors; with ``squared=True`` and
  ``negatives_reduction="sum"`` it is NetVLAD's weakly supervised ranking loss (Arandjelovic et al.,
  CVPR 2016, Eq. 7): ``sum_j max(0, d^2(q, p) + m - d^2(q, n_j))``, p the best-matching potential
  positive and n_j the (hard) negatives, mean over the batch of queries. The defaults (Euclidean d, mean
  over negatives) are the plain form the StructVPR stages use.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def channel_correlation(fmap: torch.Tensor) -> torch.Tensor:
    """Row-normalised inter-channel correlation (B, C, C) of a (B, C, H, W) map (the reference form)."""
    if fmap.ndim != 4:
        raise ValueError(f"expected a (B, C, H, W) feature map, got shape {tuple(fmap.shape)}")
    flat = fmap.flatten(2).float()
    gram = torch.bmm(flat, flat.transpose(1, 2))
    return F.normalize(gram, dim=2)


_EPS = 1e-12  # F.normalize's: a row of norm below eps is divided by eps (a zero channel stays zero)


@dataclass
class Correlation:
    """The row-normalised correlation G^ = D^-1 F F^T of maps F (B, C, N) (D: the row norms of F F^T,
    at least eps), held densely (``dense``: G^, (B, C, C)) or by its factors (``fmap``: F, ``scale``:
    the diagonal of D^-1, (B, C)). The factored form never builds the C x C matrix: for N spatial
    positions it costs O(C N^2) instead of O(C^2 N), and it is what :func:`correlation` picks when
    3 N < C (StructVPR's 320-channel map has N = 2 at 32x64 input, 80 at 240x320)."""

    dense: torch.Tensor | None = None
    fmap: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    sq: torch.Tensor | None = None  # factored: ||G^||_F^2 per sample (B,)

    @property
    def shape(self) -> tuple[int, int]:
        """(batch, channels)."""
        t = self.dense if self.dense is not None else self.fmap
        return int(t.shape[0]), int(t.shape[1])

    def sq_norm(self) -> torch.Tensor:
        """||G^||_F^2 per sample (B,)."""
        return self.dense.pow(2).sum(dim=(1, 2)) if self.dense is not None else self.sq

    def inner(self, other: Correlation) -> torch.Tensor:
        """<G^_self, G^_other>_F per sample (B,), without building a C x C matrix for a factored side."""
        if self.dense is not None and other.dense is not None:
            return (self.dense * other.dense).sum(dim=(1, 2))
        if self.dense is not None:
            return other.inner(self)
        p = self.fmap * self.scale[..., None]  # G^ = P F^T
        if other.dense is not None:  # <P F^T, G> = sum(P o (G F))
            return (p * torch.bmm(other.dense, self.fmap)).sum(dim=(1, 2))
        q = other.fmap * other.scale[..., None]  # <P F^T, Q E^T> = sum((P^T Q) o (F^T E))
        return (torch.bmm(p.transpose(1, 2), q) * torch.bmm(self.fmap.transpose(1, 2), other.fmap)).sum(
            dim=(1, 2)
        )

    def sq_distance(self, other: Correlation) -> torch.Tensor:
        """||G^_self - G^_other||_F^2 per sample (B,)."""
        if self.dense is not None and other.dense is not None:
            return (self.dense - other.dense).pow(2).sum(dim=(1, 2))
        return self.sq_norm() + other.sq_norm() - 2.0 * self.inner(other)


def correlation(fmap: torch.Tensor, *, factored: bool | None = None) -> Correlation:
    """The row-normalised inter-channel correlation of a (B, C, H, W) map, as :class:`Correlation`:
    equal to :func:`channel_correlation` (dense, or factored when ``3 * H * W < C`` unless ``factored``
    says otherwise)."""
    if fmap.ndim != 4:
        raise ValueError(f"expected a (B, C, H, W) feature map, got shape {tuple(fmap.shape)}")
    f = fmap.flatten(2).float()
    c, n = f.shape[1:]
    if not (3 * n < c if factored is None else factored):
        return Correlation(dense=F.normalize(torch.bmm(f, f.transpose(1, 2)), dim=2))
    row_sq = (torch.bmm(f, torch.bmm(f.transpose(1, 2), f)) * f).sum(2)  # (B, C) = ||row_i of F F^T||^2
    scale = row_sq.clamp_min(_EPS * _EPS).rsqrt()  # 1 / max(norm, eps), as F.normalize
    return Correlation(fmap=f, scale=scale, sq=(row_sq * scale.pow(2)).sum(1))


def ickd_loss(
    student_maps: Sequence[torch.Tensor], teacher_maps: Sequence[torch.Tensor | Correlation]
) -> torch.Tensor:
    """Inter-channel correlation distillation over paired latent maps (mean over maps):
    ``||G^_t - G^_s||_F^2 / C`` per sample, mean over the batch. A teacher entry may be its map or its
    :class:`Correlation` computed beforehand (the teacher is frozen: :class:`~.loqi.TeacherCache`)."""
    if len(student_maps) != len(teacher_maps) or not student_maps:
        raise ValueError(
            f"need equally many student and teacher maps, got {len(student_maps)} and {len(teacher_maps)}"
        )
    losses = []
    for s, t in zip(student_maps, teacher_maps, strict=True):
        t_shape = t.shape[:2] if isinstance(t, torch.Tensor) else torch.Size(t.shape)
        if s.shape[:2] != t_shape:
            raise ValueError(
                f"student map {tuple(s.shape)} and teacher map {tuple(t_shape)} differ in batch or channels"
            )
        t_corr = correlation(t.detach()) if isinstance(t, torch.Tensor) else t
        losses.append(correlation(s).sq_distance(t_corr).mean() / s.shape[1])
    return torch.stack(losses).mean()


MSE_REDUCTIONS = ("mean", "sum")


def mse_loss(
    student_desc: torch.Tensor, teacher_desc: torch.Tensor, *, reduction: str = "mean"
) -> torch.Tensor:
    """Squared error of global descriptors (B, D): ``"mean"`` over all B x D elements (the mean squared
    error), ``"sum"`` summed over the D dimensions and averaged over the batch (D times the former)."""
    if student_desc.shape != teacher_desc.shape:
        raise ValueError(
            f"descriptor shapes differ: {tuple(student_desc.shape)} vs {tuple(teacher_desc.shape)}"
        )
    if reduction not in MSE_REDUCTIONS:
        raise ValueError(f"reduction must be one of {MSE_REDUCTIONS}, got {reduction!r}")
    sq = (student_desc - teacher_desc.detach()).pow(2)
    return sq.mean() if reduction == "mean" else sq.sum(dim=-1).mean()


TRIPLET_NEGATIVES = ("sum", "mean")


def triplet_loss(
    query: torch.Tensor,
    positive: torch.Tensor,
    negatives: torch.Tensor,
    margin: float = 0.3,
    *,
    squared: bool = False,
    negatives_reduction: str = "mean",
) -> torch.Tensor:
    """Triplet margin ranking loss of query (B, D), positive (B, D) and negatives (B, N, D): per query
    ``max(0, m + d(q, p) - d(q, n_j))`` summed or averaged over its N negatives (``negatives_reduction``),
    then averaged over the B queries; d Euclidean, or squared Euclidean with ``squared``."""
    if negatives.ndim != 3 or query.shape != positive.shape or negatives.shape[::2] != query.shape:
        raise ValueError(
            f"expected query/positive (B, D) and negatives (B, N, D), got {tuple(query.shape)}, "
            f"{tuple(positive.shape)}, {tuple(negatives.shape)}"
        )
    if negatives_reduction not in TRIPLET_NEGATIVES:
        raise ValueError(
            f"negatives_reduction must be one of {TRIPLET_NEGATIVES}, got {negatives_reduction!r}"
        )
    diff_pos, diff_neg = query - positive, query[:, None, :] - negatives
    if squared:
        d_pos = diff_pos.pow(2).sum(dim=-1, keepdim=True)  # (B, 1)
        d_neg = diff_neg.pow(2).sum(dim=-1)  # (B, N)
    else:  # norm(): a zero distance has a zero (sub)gradient, where sqrt(sum) would give NaN
        d_pos, d_neg = diff_pos.norm(dim=-1, keepdim=True), diff_neg.norm(dim=-1)
    hinge = F.relu(margin + d_pos - d_neg)
    per_query = hinge.sum(dim=1) if negatives_reduction == "sum" else hinge.mean(dim=1)
    return per_query.mean()
