"""The seg-branch (StructVPR Sec. 3.2): a light MobileNet-like network on SLME maps.

Five stages, each halving the resolution (a stride-2 block, then inverted residual blocks); the last
three stages' outputs are global-max-pooled, L2-normalised, concatenated and L2-normalised again, like
the RGB student, giving 96 + 128 + 256 = 480 dimensions by default. It is a training-time teacher only
and never part of the deployed model; it is registered (``structvpr_segbranch``) so that its Stage I
checkpoints are ordinary self-describing vpr_ros checkpoints.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.mobilenetv2 import InvertedResidual

from vpr_ros.core.errors import ModelError
from vpr_ros.core.models.registry import Preprocess, VprModel, get_spec, register_model
from vpr_ros.core.models.structvpr import StructVPRStudent

SEG_CHANNELS = (16, 32, 96, 128, 256)
SEG_BLOCKS = (1, 2, 2, 2, 1)


class SegBranch(VprModel):
    """SLME (B, C, H, W) -> (B, 480) descriptor; ``forward_features`` gives the last three stage maps."""

    def __init__(
        self,
        in_channels: int = 6,
        channels: tuple[int, ...] = SEG_CHANNELS,
        blocks: tuple[int, ...] = SEG_BLOCKS,
        expand: int = 4,
    ) -> None:
        super().__init__()
        if len(channels) != 5 or len(blocks) != 5 or min(blocks) < 1:
            raise ModelError(
                f"seg-branch: 5 stages with >= 1 block each, got channels {channels}, blocks {blocks}"
            )
        stem = nn.Sequential(
            nn.Conv2d(in_channels, channels[0], 3, 2, 1, bias=False),
            nn.BatchNorm2d(channels[0]),
            nn.ReLU6(inplace=True),
        )
        stages = [
            nn.Sequential(
                stem, *(InvertedResidual(channels[0], channels[0], 1, 1) for _ in range(blocks[0] - 1))
            )
        ]
        for cin, cout, n in zip(channels[:-1], channels[1:], blocks[1:], strict=True):
            stages.append(
                nn.Sequential(
                    InvertedResidual(cin, cout, 2, expand),
                    *(InvertedResidual(cout, cout, 1, expand) for _ in range(n - 1)),
                )
            )
        self.stages = nn.ModuleList(stages)
        self.in_channels = in_channels
        self.descriptor_dim = sum(channels[-3:])

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = []
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        return maps[-3:]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return StructVPRStudent.aggregate(self.forward_features(x))


def _register() -> None:
    try:
        get_spec("structvpr_segbranch")
        return
    except ModelError:
        pass

    @register_model(
        "structvpr_segbranch",
        description="StructVPR seg-branch (training-time teacher): 5-stage MobileNet-like net on SLME maps, "
        "multi-level GMP of the last three stages -> 480-d",
        preprocess=Preprocess(input_size=(96, 320), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)),
        in_channels=6,
        channels=list(SEG_CHANNELS),
        blocks=list(SEG_BLOCKS),
        expand=4,
    )
    def structvpr_segbranch(
        pretrained: bool = False,
        in_channels: int = 6,
        channels=SEG_CHANNELS,
        blocks=SEG_BLOCKS,
        expand: int = 4,
    ) -> SegBranch:
        if pretrained:
            raise ModelError(
                "structvpr_segbranch has no pretrained weights; it is trained in StructVPR Stage I"
            )
        return SegBranch(
            int(in_channels), tuple(int(c) for c in channels), tuple(int(b) for b in blocks), int(expand)
        )


_register()
