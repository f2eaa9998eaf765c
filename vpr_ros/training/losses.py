"""The three LoQI losses (Yang et al., "Distillation Improves Visual Place Recognition for Low Quality
Images", arXiv 2310.06906), as plain functions of tensors.

* :func:`ickd_loss` -- inter-channel correlation knowledge distillation (Liu et al., ICCV 2021) on the
  latent maps: for a map F (C x HW) the C x C correlation G = F F^T, each row L2-normalised as in the
  ICKD reference implementation; the loss is ||G_t - G_s||_F^2 / C, averaged over the batch and over
  the maps. It is 0 for identical maps and invariant to a positive rescaling of either map and to any
  permutation of the spatial positions (it compares channel relations, not pixels), so student and
  teacher maps may even differ in spatial size.
* :func:`mse_loss` -- squared L2 distance between student and teacher global descriptors (summed over
  dimensions, averaged over the batch; ``2 - 2 cos`` for L2-normalised descriptors).
* :func:`triplet_loss` -- the weakly supervised triplet margin ranking loss of NetVLAD on the student's
  descriptors: mean over negatives of ``max(0, m + d(q, p) - d(q, n))`` with Euclidean d.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def channel_correlation(fmap: torch.Tensor) -> torch.Tensor:
    """Row-normalised inter-channel correlation (B, C, C) of a (B, C, H, W) map."""
    if fmap.ndim != 4:
        raise ValueError(f"expected a (B, C, H, W) feature map, got shape {tuple(fmap.shape)}")
    flat = fmap.flatten(2).float()
    gram = torch.bmm(flat, flat.transpose(1, 2))
    return F.normalize(gram, dim=2)


def ickd_loss(student_maps: Sequence[torch.Tensor], teacher_maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Inter-channel correlation distillation over paired latent maps (mean over maps)."""
    if len(student_maps) != len(teacher_maps) or not student_maps:
        raise ValueError(
            f"need equally many student and teacher maps, got {len(student_maps)} and {len(teacher_maps)}"
        )
    losses = []
    for s, t in zip(student_maps, teacher_maps, strict=True):
        if s.shape[:2] != t.shape[:2]:
            raise ValueError(
                f"student map {tuple(s.shape)} and teacher map {tuple(t.shape)} differ in batch or channels"
            )
        diff = channel_correlation(s) - channel_correlation(t.detach())
        losses.append(diff.pow(2).sum(dim=(1, 2)).mean() / s.shape[1])
    return torch.stack(losses).mean()


def mse_loss(student_desc: torch.Tensor, teacher_desc: torch.Tensor) -> torch.Tensor:
    """Squared L2 distance of global descriptors, summed over dimensions, mean over the batch."""
    if student_desc.shape != teacher_desc.shape:
        raise ValueError(
            f"descriptor shapes differ: {tuple(student_desc.shape)} vs {tuple(teacher_desc.shape)}"
        )
    return (student_desc - teacher_desc.detach()).pow(2).sum(dim=-1).mean()


def triplet_loss(
    query: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor, margin: float = 0.3
) -> torch.Tensor:
    """Triplet margin ranking loss: query (B, D), positive (B, D), negatives (B, N, D)."""
    if negatives.ndim != 3 or query.shape != positive.shape or negatives.shape[::2] != query.shape:
        raise ValueError(
            f"expected query/positive (B, D) and negatives (B, N, D), got {tuple(query.shape)}, "
            f"{tuple(positive.shape)}, {tuple(negatives.shape)}"
        )
    d_pos = (query - positive).norm(dim=-1, keepdim=True)  # (B, 1)
    d_neg = (query[:, None, :] - negatives).norm(dim=-1)  # (B, N)
    return F.relu(margin + d_pos - d_neg).mean()
