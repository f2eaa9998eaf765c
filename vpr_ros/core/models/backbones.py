"""Backbones shared by the registered models, built through their libraries' normal APIs.

Pretrained weights never go through pickle: torchvision's weights API loads its cached files
with ``torch.load(weights_only=False)``, so they are read here with ``weights_only=True``
(:func:`mobilenet_v2_features`, :func:`weights_only_loads`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from torch import nn

from vpr_ros import paths
from vpr_ros.core.errors import ModelError

#: Indices into torchvision's ``mobilenet_v2().features`` that end the stages whose
#: outputs StructVPR concatenates: 32 channels at stride 8, 96 at 16, 320 at 32.
MOBILENETV2_STAGE_ENDS = (6, 13, 17)
MOBILENETV2_STAGE_CHANNELS = (32, 96, 320)


def mobilenet_v2_features(pretrained: bool) -> nn.Sequential:
    """torchvision MobileNetV2 ``features[:18]`` (the 1280-channel head conv is dropped).

    ``pretrained`` uses ``MobileNet_V2_Weights.IMAGENET1K_V1``; offline, torchvision finds the
    file in ``$TORCH_HOME/hub/checkpoints`` before trying to download it.
    """
    # torchvision: only models with an ImageNet backbone
    from torchvision.models import MobileNet_V2_Weights, mobilenet_v2

    net = mobilenet_v2(weights=None)
    try:
        if pretrained:  # what mobilenet_v2(weights=...) does, minus the pickle load of the cached file
            state = MobileNet_V2_Weights.IMAGENET1K_V1.get_state_dict(progress=False, check_hash=True,
                                                                      weights_only=True)
            net.load_state_dict(state)
    except Exception as exc:  # network or file errors from torch.hub, a file that is not plain weights
        home = paths.torch_home()
        raise ModelError(
            "could not load torchvision's ImageNet MobileNetV2 weights "
            f"(looked in {home}/hub/checkpoints, then tried to download): {exc}. "
            "Seed TORCH_HOME with mobilenet_v2-b0353104.pth or build with pretrained=False."
        ) from exc
    return net.features[: MOBILENETV2_STAGE_ENDS[-1] + 1]


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every ``torch.load`` inside the block uses ``weights_only=True``, even where a library asks
    for ``False`` (torchvision's weights API does). Sets ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` for the
    block: process-wide, but it only ever makes loads stricter."""
    key = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
    previous = os.environ.get(key)
    os.environ[key] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = previous
