"""StructVPR's RGB student: MobileNetV2 with multi-level global max pooling (448-d).

Shen et al., "StructVPR: Distill Structural Knowledge with Weighting Samples for Visual
Place Recognition" (CVPR 2023): the outputs of the last three MobileNetV2 stages
(32, 96, 320 channels) are each global-max-pooled and L2-normalised, concatenated, and
L2-normalised again.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vpr_ros.core.models.backbones import (
    MOBILENETV2_STAGE_CHANNELS,
    MOBILENETV2_STAGE_ENDS,
    mobilenet_v2_features,
)
from vpr_ros.core.models.registry import VprModel, register_model


class StructVPRStudent(VprModel):
    """MobileNetV2 trunk + multi-level concatenated GMP descriptor."""

    def __init__(self, pretrained: bool = False) -> None:
        super().__init__()
        self.features = mobilenet_v2_features(pretrained)
        self.stage_ends = MOBILENETV2_STAGE_ENDS
        self.descriptor_dim = sum(MOBILENETV2_STAGE_CHANNELS)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The three stage outputs (B, 32, H/8, W/8), (B, 96, H/16, W/16), (B, 320, H/32, W/32)."""
        maps = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.stage_ends:
                maps.append(x)
        return maps

    @staticmethod
    def aggregate(maps: list[torch.Tensor]) -> torch.Tensor:
        parts = [F.normalize(torch.amax(m, dim=(2, 3)), dim=1) for m in maps]
        return F.normalize(torch.cat(parts, dim=1), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.aggregate(self.forward_features(x))


@register_model(
    "structvpr_mobilenetv2",
    description="StructVPR RGB student: MobileNetV2, multi-level GMP of stages 32/96/320 -> 448-d",
)
def structvpr_mobilenetv2(pretrained: bool = False) -> StructVPRStudent:
    return StructVPRStudent(pretrained=pretrained)
