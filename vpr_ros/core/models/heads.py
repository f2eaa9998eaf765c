"""Other aggregators on the MobileNetV2 trunk (GeM, NetVLAD), so distillation methods can be
shown on more than one head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vpr_ros.core.models.backbones import MOBILENETV2_STAGE_CHANNELS, mobilenet_v2_features
from vpr_ros.core.models.registry import VprModel, register_model


class GeM(nn.Module):
    """Generalised mean pooling with a learnable exponent p (Radenović et al.)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(min=self.eps).pow(self.p).mean(dim=(2, 3)).pow(1.0 / self.p)


class NetVLAD(nn.Module):
    """NetVLAD (Arandjelović et al.): soft-assigned residuals to K learnt centroids."""

    def __init__(self, channels: int, clusters: int = 16, alpha: float = 100.0) -> None:
        super().__init__()
        self.clusters = clusters
        self.centroids = nn.Parameter(torch.randn(clusters, channels) * 0.1)
        self.assign = nn.Conv2d(channels, clusters, kernel_size=1, bias=True)
        with torch.no_grad():  # the paper's initialisation from centroids
            c = F.normalize(self.centroids, dim=1)
            self.assign.weight.copy_((2.0 * alpha * c)[:, :, None, None])
            self.assign.bias.copy_(-alpha * c.norm(dim=1) ** 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(x, dim=1)
        soft = F.softmax(self.assign(x).flatten(2), dim=1)  # (B, K, HW)
        flat = x.flatten(2)  # (B, C, HW)
        vlad = torch.einsum("bkn,bcn->bkc", soft, flat) - soft.sum(2)[:, :, None] * self.centroids[None]
        vlad = F.normalize(vlad, dim=2)  # intra-normalisation
        return vlad.flatten(1)


class MobileNetV2Pooled(VprModel):
    """MobileNetV2 trunk (last stage, 320 channels) + a pooling head + optional projection."""

    def __init__(self, head: nn.Module, head_dim: int, out_dim: int, pretrained: bool) -> None:
        super().__init__()
        self.features = mobilenet_v2_features(pretrained)
        self.head = head
        self.proj = nn.Linear(head_dim, out_dim) if out_dim and out_dim != head_dim else nn.Identity()
        self.descriptor_dim = out_dim or head_dim

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.features(x)]

    def aggregate(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """Descriptor from :meth:`forward_features`' output (distillation uses both, one pass)."""
        return F.normalize(self.proj(self.head(maps[-1])), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.aggregate(self.forward_features(x))


@register_model(
    "gem_mobilenetv2",
    description="MobileNetV2 (320-ch last stage) + GeM pooling (+ optional linear projection)",
    p=3.0,
    dim=0,
)
def gem_mobilenetv2(pretrained: bool = False, p: float = 3.0, dim: int = 0) -> MobileNetV2Pooled:
    c = MOBILENETV2_STAGE_CHANNELS[-1]
    return MobileNetV2Pooled(GeM(p), c, dim, pretrained)


@register_model(
    "netvlad_mobilenetv2",
    description="MobileNetV2 (320-ch last stage) + NetVLAD (K clusters -> K*320-d, optional projection)",
    clusters=16,
    dim=0,
)
def netvlad_mobilenetv2(pretrained: bool = False, clusters: int = 16, dim: int = 0) -> MobileNetV2Pooled:
    c = MOBILENETV2_STAGE_CHANNELS[-1]
    return MobileNetV2Pooled(NetVLAD(c, clusters), c * clusters, dim, pretrained)
