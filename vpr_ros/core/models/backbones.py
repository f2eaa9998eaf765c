"""Backbones shared by the registered models, built through their libraries' normal APIs."""

from __future__ import annotations

import os

from torch import nn

from ..errors import ModelError

#: Indices into torchvision's ``mobilenet_v2().features`` that end the stages whose
#: outputs StructVPR concatenates: 32 channels at stride 8, 96 at 16, 320 at 32.
MOBILENETV2_STAGE_ENDS = (6, 13, 17)
MOBILENETV2_STAGE_CHANNELS = (32, 96, 320)


def mobilenet_v2_features(pretrained: bool) -> nn.Sequential:
    """torchvision MobileNetV2 ``features[:18]`` (the 1280-channel head conv is dropped).

    ``pretrained`` uses ``MobileNet_V2_Weights.IMAGENET1K_V1``; offline, torchvision finds the
    file in ``$TORCH_HOME/hub/checkpoints`` before trying to download it.
    """
    from torchvision.models import MobileNet_V2_Weights, mobilenet_v2

    weights = MobileNet_V2_Weights.IMAGENET1K_V1 if pretrained else None
    try:
        net = mobilenet_v2(weights=weights)
    except Exception as exc:  # network or file errors from torch.hub
        home = os.environ.get("TORCH_HOME", "~/.cache/torch")
        raise ModelError(
            "could not load torchvision's ImageNet MobileNetV2 weights "
            f"(looked in {home}/hub/checkpoints, then tried to download): {exc}. "
            "Seed TORCH_HOME with mobilenet_v2-b0353104.pth or build with pretrained=False."
        ) from exc
    return net.features[: MOBILENETV2_STAGE_ENDS[-1] + 1]
