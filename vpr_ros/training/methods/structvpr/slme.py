"""SLME -- segmentation label map encoding (StructVPR Sec. 3.1).

A segmenter's classes are clustered into C groups; each group is one channel of a one-hot C x H x W
map, scaled by the group's weight (stable structure counts more than things that change). The default
is the paper's C = 6: vegetation, dynamic objects, sky, ground, buildings, other objects, weighted
0.5, 0.5, 1, 1, 2, 2. For Cityscapes classes the groups are Cityscapes' own categories (nature, human +
vehicle, sky, flat, construction, object); its void/background class belongs to no group (all-zero
pixel). :data:`SLME3` is the C = 3 variant (changing / layout / structure).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np

from vpr_ros.core.errors import ConfigError

#: The paper's six groups over the Cityscapes classes, with their weights.
SLME6_GROUPS: dict[str, list[str]] = {
    "vegetation": ["vegetation", "terrain"],
    "dynamic": ["person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle"],
    "sky": ["sky"],
    "ground": ["road", "sidewalk"],
    "buildings": ["building", "wall", "fence"],
    "objects": ["pole", "traffic light", "traffic sign"],
}
SLME6_WEIGHTS = [0.5, 0.5, 1.0, 1.0, 2.0, 2.0]

#: The three-group variant: what changes, the scene layout, the lasting structure.
SLME3_GROUPS: dict[str, list[str]] = {
    "changing": SLME6_GROUPS["vegetation"] + SLME6_GROUPS["dynamic"],
    "layout": SLME6_GROUPS["sky"] + SLME6_GROUPS["ground"],
    "structure": SLME6_GROUPS["buildings"] + SLME6_GROUPS["objects"],
}
SLME3_WEIGHTS = [0.5, 1.0, 2.0]


@dataclass
class SLMEConfig:
    """Class groups (channel order = mapping order) and their weights; ``size`` [H, W] of the encoded maps
    (None: the RGB student's input size)."""

    groups: dict[str, list[str]] = field(
        default_factory=lambda: {k: list(v) for k, v in SLME6_GROUPS.items()}
    )
    weights: list[float] = field(default_factory=lambda: list(SLME6_WEIGHTS))
    size: list[int] | None = None

    @classmethod
    def preset(cls, channels: int, size: list[int] | None = None) -> SLMEConfig:
        """The paper's C = 6 encoding or the C = 3 variant."""
        if channels == 6:
            return cls(size=size)
        if channels == 3:
            return cls({k: list(v) for k, v in SLME3_GROUPS.items()}, list(SLME3_WEIGHTS), size)
        raise ConfigError(f"slme: presets exist for 6 and 3 groups, not {channels}")


class SLMEncoder:
    """Class map (H, W) uint8 -> weighted one-hot (C, h, w) float32 map."""

    def __init__(self, cfg: SLMEConfig, classes: Sequence[str]) -> None:
        if len(cfg.weights) != len(cfg.groups):
            raise ConfigError(f"slme.weights: {len(cfg.weights)} weights for {len(cfg.groups)} groups")
        if any(w < 0 for w in cfg.weights):
            raise ConfigError(f"slme.weights: must be >= 0, got {cfg.weights}")
        self.names = list(cfg.groups)
        self.weights = np.asarray(cfg.weights, dtype=np.float32)
        self.size = tuple(cfg.size) if cfg.size else None
        self.classes = tuple(classes)
        index = {c: i for i, c in enumerate(self.classes)}
        self.table = np.full(256, -1, dtype=np.int64)  # class id -> group channel, -1: no group
        for g, (group, members) in enumerate(cfg.groups.items()):
            for c in members:
                if c not in index:
                    raise ConfigError(
                        f"slme.groups.{group}: class {c!r} is not one of the segmenter's classes "
                        f"{list(self.classes)}"
                    )
                if self.table[index[c]] >= 0:
                    raise ConfigError(
                        f"slme.groups.{group}: class {c!r} is already in group "
                        f"{self.names[self.table[index[c]]]!r}"
                    )
                self.table[index[c]] = g

    @property
    def channels(self) -> int:
        return len(self.names)

    def group_map(self, labels: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
        """(h, w) int64 group index per pixel (-1: no group), resized with nearest neighbour."""
        size = size or self.size
        if labels.ndim != 2:
            raise ValueError(f"expected an (H, W) class map, got shape {labels.shape}")
        if size is not None and labels.shape != tuple(size):
            labels = cv2.resize(labels, (size[1], size[0]), interpolation=cv2.INTER_NEAREST)
        return self.table[labels]

    def __call__(self, labels: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
        """Weighted one-hot (C, h, w) float32."""
        groups = self.group_map(labels, size)
        onehot = (groups[None] == np.arange(self.channels)[:, None, None]).astype(np.float32)
        return onehot * self.weights[:, None, None]
