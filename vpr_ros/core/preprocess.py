"""Model input preparation: RGB uint8 images -> the normalised (B, 3, H, W) tensor a model's
:class:`~vpr_ros.core.models.registry.Preprocess` asks for (every backend and the training loaders use it)."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch

from vpr_ros.core.models.registry import Preprocess


def resize_rgb(image: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    """Resize to ``size`` = (H, W): area interpolation when shrinking, bilinear when enlarging."""
    if size is None or image.shape[:2] == tuple(size):
        return image
    h, w = size
    shrink = h * w < image.shape[0] * image.shape[1]
    return cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def to_tensor_batch(images: Sequence[np.ndarray], pre: Preprocess) -> torch.Tensor:
    """Stack same-size RGB uint8 images into a normalised (B, 3, H, W) float tensor."""
    arr = np.stack([resize_rgb(im, pre.input_size) for im in images])
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(pre.mean).view(1, 3, 1, 1)
    std = torch.tensor(pre.std).view(1, 3, 1, 1)
    return (x - mean) / std
