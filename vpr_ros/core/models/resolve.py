"""Pick the model a run uses: a weights file, a registered name, or the packaged default."""

from __future__ import annotations

import dataclasses
import logging
import os

from vpr_ros import paths
from vpr_ros.core.errors import ModelError
from vpr_ros.core.models.checkpoint import load_model
from vpr_ros.core.models.registry import VprModel, check_input_size, create_model

log = logging.getLogger(__name__)

WEIGHTS_DIR = paths.WEIGHTS_DIR
PACKAGED = paths.PACKAGED  # the students shipped with the package, by their model card's key
DEFAULT_KEY = paths.DEFAULT_KEY
DEFAULT_WEIGHTS = PACKAGED[DEFAULT_KEY]
DEFAULT_MODEL = "structvpr_mobilenetv2"


def resolve_model(
    weights: str | os.PathLike | None = None,
    model: str | None = None,
    *,
    pretrained: bool = True,
    input_size: tuple[int, int] | None | str = "keep",
) -> VprModel:
    """Return an eval-mode model on CPU.

    ``weights`` (a checkpoint path, a packaged student's key of :data:`PACKAGED`, or ``"default"``
    for the packaged default student) wins; else
    ``model`` builds a registered model (ImageNet backbone when ``pretrained``); with neither,
    the packaged student is used when present, else ImageNet-initialised StructVPR.
    ``input_size`` overrides the preprocessing size ((H, W), or None for native size).
    """
    if weights == "default" or (weights is None and model is None):
        if DEFAULT_WEIGHTS.is_file():
            weights = DEFAULT_WEIGHTS
        elif weights == "default":
            raise ModelError(f"the packaged default weights {DEFAULT_WEIGHTS} are missing")
        else:
            model = DEFAULT_MODEL
            log.info("no packaged weights at %s: using ImageNet-initialised %s", DEFAULT_WEIGHTS, model)
    if isinstance(weights, str) and weights in PACKAGED:
        if not PACKAGED[weights].is_file():
            raise ModelError(f"the packaged {weights!r} student {PACKAGED[weights]} is missing")
        weights = PACKAGED[weights]
    if weights is not None:
        net = load_model(weights, expected_name=model)
    else:
        net = create_model(model, pretrained=pretrained).eval()
    if input_size != "keep":
        net.preprocess = dataclasses.replace(net.preprocess, input_size=input_size)
    return net


def parse_size(text: str) -> tuple[int, int] | None:
    """``"240x320"`` -> (240, 320) as (H, W); ``"native"`` -> None."""
    if text.lower() in ("native", "none"):
        return None
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ModelError(f"bad input size {text!r}; expected HxW such as 240x320, or 'native'") from None
    check_input_size(h, w, "input size")
    return h, w
