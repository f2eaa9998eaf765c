"""Semantic segmentation sources: per-image class maps, computed once offline and cached.

A :class:`Segmenter` turns an RGB uint8 image (or an image file) into an ``(H, W)`` uint8 class map at
the image's resolution, with its class names in ``classes`` and a stable ``id`` that keys the cache.
Sources:

* :class:`ESPNetv2Segmenter` -- ESPNetv2 (Mehta et al., "ESPNetv2: A Light-weight, Power Efficient, and
  General Purpose Convolutional Neural Network", CVPR 2019) trained on Cityscapes: 19 classes + background.
  The network is written here from the paper (EESP units, strided EESP with input reinforcement,
  efficient pyramid pooling decoder) with module names that load the published checkpoints strictly;
  the width scale ``s`` (1.0, 2.0, ...) is read from the checkpoint.
* :class:`LabelFolderSegmenter` -- label maps someone computed before (PNG class indices).
* :class:`TorchvisionSegmenter` / :class:`TransformersSegmenter` -- optional plugs for other models,
  loaded through their libraries with no download at run time.

:class:`LabelCache` stores label maps as lossless PNGs keyed by (image path, size, mtime, segmenter id);
:func:`segment_files` fills it (the offline pass) and returns the cached files.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from vpr_ros.core.errors import DatasetError, ImageError, ModelError
from vpr_ros.core.fileio import confined_path, write_file_checked
from vpr_ros.core.images import as_rgb8, check_encoded_size, load_image
from vpr_ros.core.models.backbones import weights_only_loads
from vpr_ros.core.models.registry import IMAGENET_MEAN, IMAGENET_STD, select_device

log = logging.getLogger(__name__)

#: Cityscapes train classes in trainId order, plus the "background" (void) output of 20-class models.
CITYSCAPES_CLASSES = (
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
    "background",
)

#: The official Cityscapes colours of those classes (RGB); background black.
CITYSCAPES_PALETTE = np.array(
    [
        (128, 64, 128),
        (244, 35, 232),
        (70, 70, 70),
        (102, 102, 156),
        (190, 153, 153),
        (153, 153, 153),
        (250, 170, 30),
        (220, 220, 0),
        (107, 142, 35),
        (152, 251, 152),
        (70, 130, 180),
        (220, 20, 60),
        (255, 0, 0),
        (0, 0, 142),
        (0, 0, 70),
        (0, 60, 100),
        (0, 80, 100),
        (0, 0, 230),
        (119, 11, 32),
        (0, 0, 0),
    ],
    dtype=np.uint8,
)


def colorize(labels: np.ndarray, palette: np.ndarray = CITYSCAPES_PALETTE) -> np.ndarray:
    """RGB picture of a class map (classes beyond the palette are black)."""
    pal = np.zeros((256, 3), np.uint8)
    pal[: len(palette)] = palette
    return pal[labels]


# --------------------------------------------------------------------------- the interface


class Segmenter(ABC):
    """Image -> ``(H, W)`` uint8 class map (indices into ``classes``) at the image's resolution."""

    id: str = ""
    classes: tuple[str, ...] = ()

    @abstractmethod
    def segment(self, image: np.ndarray) -> np.ndarray:
        """Class map of one RGB uint8 image."""

    def segment_file(self, path: str | os.PathLike) -> np.ndarray:
        """Class map of an image file (a label-folder source reads its map instead)."""
        return self.segment(load_image(path))


class TorchSegmenter(Segmenter):
    """A segmenter whose :meth:`logits` is a torch model: resize, normalise, run, upsample, argmax."""

    def __init__(self, *, device: str | torch.device = "cpu", mean=IMAGENET_MEAN, std=IMAGENET_STD) -> None:
        self.device = device if isinstance(device, torch.device) else select_device(device)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    @abstractmethod
    def input_size(self, h: int, w: int) -> tuple[int, int]:
        """The (H, W) the network runs at for an ``h`` x ``w`` image."""

    @abstractmethod
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, K, h, w) class scores of a normalised (B, 3, H, W) batch."""

    @torch.inference_mode()
    def segment(self, image: np.ndarray) -> np.ndarray:
        image = as_rgb8(image)
        h, w = image.shape[:2]
        ih, iw = self.input_size(h, w)
        resized = image if (ih, iw) == (h, w) else cv2.resize(image, (iw, ih), interpolation=cv2.INTER_LINEAR)
        x = torch.from_numpy(resized).permute(2, 0, 1)[None].float().div_(255.0)
        x = ((x - self.mean) / self.std).to(self.device)
        scores = self.logits(x)
        scores = F.interpolate(scores.float(), size=(h, w), mode="bilinear", align_corners=False)
        return scores.argmax(1)[0].to(torch.uint8).cpu().numpy()


# --------------------------------------------------------------------------- ESPNetv2 building blocks
# Layer names follow the published checkpoints so that they load with strict=True.


class CBR(nn.Module):
    """Conv (no bias) -> BatchNorm -> PReLU, as ``conv`` / ``bn`` / ``act``."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, padding=(k - 1) // 2, bias=False, groups=groups)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.PReLU(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class CB(nn.Module):
    """Conv (no bias) -> BatchNorm."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, padding=(k - 1) // 2, bias=False, groups=groups)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class BR(nn.Module):
    """BatchNorm -> PReLU."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(c)
        self.act = nn.PReLU(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(x))


class DWDilated(nn.Module):
    """Depth-wise dilated 3x3 convolution (no bias), as ``conv``."""

    def __init__(self, c: int, stride: int, dilation: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride, padding=dilation, dilation=dilation, groups=c, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def _cbr_seq(cin: int, cout: int, k: int, groups: int = 1) -> nn.Sequential:
    """The decoder's Conv-BN-PReLU, as a Sequential ``0`` / ``1`` / ``2``."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, 1, padding=(k - 1) // 2, bias=False, groups=groups),
        nn.BatchNorm2d(cout),
        nn.PReLU(cout),
    )


class _Wrap(nn.Module):
    """Holds a Sequential under the attribute name the checkpoints use (``cbr`` / ``br``)."""

    def __init__(self, name: str, seq: nn.Sequential) -> None:
        super().__init__()
        self.name = name
        self.add_module(name, seq)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, self.name)(x)


def _br_seq(c: int) -> _Wrap:
    return _Wrap("br", nn.Sequential(nn.BatchNorm2d(c), nn.PReLU(c)))


class EESP(nn.Module):
    """Extremely Efficient Spatial Pyramid unit (paper Fig. 1c/d, Sec. 3.2).

    Group point-wise reduction to ``n = cout / k`` channels, ``k`` parallel depth-wise dilated 3x3 branches
    whose outputs are added hierarchically (HFF, removes gridding), concatenation, BN-PReLU, a group
    point-wise expansion and a residual connection. The dilations grow with the branch (effective kernel
    3, 5, 7, ...) up to the receptive-field limit ``r_lim`` of the level; a kernel over the limit falls
    back to 3 (dilation 1). ``stride=2`` makes the strided unit of the down-sampling block (no residual,
    no activation: the block adds its own).
    """

    def __init__(self, cin: int, cout: int, stride: int = 1, k: int = 4, r_lim: int = 7) -> None:
        super().__init__()
        n = cout // k
        if n * k != cout:
            raise ModelError(f"EESP: {cout} output channels do not split into {k} branches")
        self.stride = stride
        self.proj_1x1 = CBR(cin, n, 1, groups=k)
        ksizes = sorted(ks if ks <= r_lim else 3 for ks in (3 + 2 * i for i in range(k)))
        self.spp_dw = nn.ModuleList(DWDilated(n, stride, (ks - 1) // 2) for ks in ksizes)
        self.conv_1x1_exp = CB(cout, cout, 1, groups=k)
        self.br_after_cat = BR(cout)
        self.module_act = nn.PReLU(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        reduced = self.proj_1x1(x)
        outs = [self.spp_dw[0](reduced)]
        for branch in self.spp_dw[1:]:
            outs.append(branch(reduced) + outs[-1])  # hierarchical feature fusion
        expanded = self.conv_1x1_exp(self.br_after_cat(torch.cat(outs, 1)))
        if self.stride == 2:
            return expanded
        if expanded.shape == x.shape:
            expanded = expanded + x
        return self.module_act(expanded)


class StridedEESP(nn.Module):
    """Down-sampling block (paper Fig. 4): [avg-pool(x), strided EESP(x)] concatenated, plus a projection
    of the input image pooled to the same size (input reinforcement), then PReLU."""

    def __init__(self, cin: int, cout: int, k: int = 4, r_lim: int = 9) -> None:
        super().__init__()
        self.eesp = EESP(cin, cout - cin, stride=2, k=k, r_lim=r_lim)
        self.inp_reinf = nn.Sequential(CBR(3, 3, 3), CB(3, cout, 1))
        self.act = nn.PReLU(cout)

    def forward(self, x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        pooled = F.avg_pool2d(x, 3, stride=2, padding=1)
        out = torch.cat([pooled, self.eesp(x)], 1)
        while image.shape[2] > pooled.shape[2]:
            image = F.avg_pool2d(image, 3, stride=2, padding=1)
        return self.act(out + self.inp_reinf(image))


class EESPNetEncoder(nn.Module):
    """The ESPNetv2 backbone up to output stride 16 (levels 1-4; level 5 and the classifier are dropped).

    Channels for width scale ``s``: base ``b = ceil(32 s / 4) * 4`` (never above 32 at level 1), then
    ``32, 2b, 4b, 8b`` at strides 2, 4, 8, 16; 3 EESP units at level 3 and 7 at level 4; receptive-field
    limits 13, 11, 9, 7 (the deeper, smaller maps use smaller dilations).
    """

    REPS = (3, 7)
    R_LIM = (13, 11, 9, 7)

    def __init__(self, s: float, k: int = 4) -> None:
        super().__init__()
        base_s = math.ceil(int(32 * s) / k) * k
        self.channels = (min(32, base_s), 2 * base_s, 4 * base_s, 8 * base_s)
        c1, c2, c3, c4 = self.channels
        self.level1 = CBR(3, c1, 3, stride=2)
        self.level2_0 = StridedEESP(c1, c2, k, self.R_LIM[0])
        self.level3_0 = StridedEESP(c2, c3, k, self.R_LIM[1])
        self.level3 = nn.ModuleList(EESP(c3, c3, 1, k, self.R_LIM[2]) for _ in range(self.REPS[0]))
        self.level4_0 = StridedEESP(c3, c4, k, self.R_LIM[2])
        self.level4 = nn.ModuleList(EESP(c4, c4, 1, k, self.R_LIM[3]) for _ in range(self.REPS[1]))

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps at strides 2, 4, 8, 16."""
        l1 = self.level1(image)
        l2 = self.level2_0(l1, image)
        l3 = self.level3_0(l2, image)
        for unit in self.level3:
            l3 = unit(l3)
        l4 = self.level4_0(l3, image)
        for unit in self.level4:
            l4 = unit(l4)
        return [l1, l2, l3, l4]


class ChannelShuffle(nn.Module):
    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        return x.view(b, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class EfficientPyramidPool(nn.Module):
    """Efficient pyramid pooling (paper Sec. 4.2, Fig. 6): project to few channels, depth-wise 3x3 at
    scales 2, 1.5, 1, 0.5, 0.1 of the map, fuse (BN-PReLU, channel shuffle, group 3x3 conv), expand."""

    SCALES = (2.0, 1.5, 1.0, 0.5, 0.1)

    def __init__(self, cin: int, proj: int, cout: int, last_br: bool = True) -> None:
        super().__init__()
        p = len(self.SCALES)
        self.projection_layer = _Wrap("cbr", _cbr_seq(cin, proj, 1))
        self.stages = nn.ModuleList(nn.Conv2d(proj, proj, 3, 1, 1, bias=False, groups=proj) for _ in range(p))
        self.merge_layer = nn.Sequential(
            _br_seq(proj * p),
            ChannelShuffle(p),
            _Wrap("cbr", _cbr_seq(proj * p, proj, 3, groups=proj)),
            nn.Conv2d(proj, cout, 1, bias=not last_br),
        )
        self.br = _br_seq(cout) if last_br else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.projection_layer(x)
        h, w = x.shape[2:]
        outs = []
        for scale, stage in zip(self.SCALES, self.stages, strict=True):
            hs, ws = max(5, math.ceil(h * scale)), max(5, math.ceil(w * scale))
            if scale < 1.0:
                y = stage(F.adaptive_avg_pool2d(x, (hs, ws)))
                y = F.interpolate(y, (h, w), mode="bilinear", align_corners=True)
            elif scale > 1.0:
                y = stage(F.interpolate(x, (hs, ws), mode="bilinear", align_corners=True))
                y = F.adaptive_avg_pool2d(y, (h, w))
            else:
                y = stage(x)
            outs.append(y)
        out = self.merge_layer(torch.cat(outs, 1))
        return self.br(out) if self.br is not None else out


class EfficientPWConv(nn.Module):
    """Encoder-to-decoder projection: group 3x3 CBR (groups = gcd) gated by a global channel attention."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.wt_layer = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, cout, 1, bias=False), nn.Sigmoid()
        )
        self.expansion_layer = _Wrap("cbr", _cbr_seq(cin, cout, 3, groups=math.gcd(cin, cout)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.expansion_layer(x) * self.wt_layer(x)


class ESPNetv2Seg(nn.Module):
    """ESPNetv2 segmentation network: EESPNet encoder (output stride 16) and a bottom-up decoder of
    efficient pyramid pooling blocks, each upsampled x2 and merged with the encoder map of that stride.

    ``base_dec`` = 16 for Cityscapes gives decoder widths 64, 48, 32, classes.
    """

    def __init__(self, s: float = 2.0, classes: int = 20, base_dec: int = 16) -> None:
        super().__init__()
        self.base_net = EESPNetEncoder(s)
        c1, c2, c3, c4 = self.base_net.channels
        d = (4 * base_dec, 3 * base_dec, 2 * base_dec, classes)
        proj = min(classes // 2, base_dec)
        self.bu_dec_l1 = EfficientPyramidPool(c4, proj, d[0])
        self.bu_dec_l2 = EfficientPyramidPool(d[0], proj, d[1])
        self.bu_dec_l3 = EfficientPyramidPool(d[1], proj, d[2])
        self.bu_dec_l4 = EfficientPyramidPool(d[2], proj, d[3], last_br=False)
        self.merge_enc_dec_l2 = EfficientPWConv(c3, d[0])
        self.merge_enc_dec_l3 = EfficientPWConv(c2, d[1])
        self.merge_enc_dec_l4 = EfficientPWConv(c1, d[2])
        self.bu_br_l2 = nn.Sequential(nn.BatchNorm2d(d[0]), nn.PReLU(d[0]))
        self.bu_br_l3 = nn.Sequential(nn.BatchNorm2d(d[1]), nn.PReLU(d[1]))
        self.bu_br_l4 = nn.Sequential(nn.BatchNorm2d(d[2]), nn.PReLU(d[2]))

    @staticmethod
    def _up(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=like.shape[2:], mode="bilinear", align_corners=True)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """(B, classes, H, W) scores of a normalised (B, 3, H, W) batch."""
        l1, l2, l3, l4 = self.base_net(image)
        out = self.bu_dec_l1(l4)
        out = self.bu_dec_l2(self.bu_br_l2(self.merge_enc_dec_l2(l3) + self._up(out, l3)))
        out = self.bu_dec_l3(self.bu_br_l3(self.merge_enc_dec_l3(l2) + self._up(out, l2)))
        out = self.bu_dec_l4(self.bu_br_l4(self.merge_enc_dec_l4(l1) + self._up(out, l1)))
        return F.interpolate(out, size=image.shape[2:], mode="bilinear", align_corners=True)


def _espnet_scale(state: dict[str, torch.Tensor], source: str) -> float:
    key = "base_net.level2_0.act.weight"
    if key not in state:
        raise ModelError(
            f"{source}: not an ESPNetv2 segmentation checkpoint (no {key!r}; first keys: {list(state)[:3]})"
        )
    return state[key].shape[0] / 64.0  # level-2 width is 2 * ceil(32 s / 4) * 4


def load_espnetv2(path: str | os.PathLike, *, s: float | None = None) -> ESPNetv2Seg:
    """Build ESPNetv2 for the checkpoint at ``path`` and load it strictly (eval mode).

    The width scale and class count are read from the checkpoint; a given ``s`` that disagrees, missing
    or unexpected keys, or a tensor of another shape raise :class:`ModelError` naming the problem.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: ESPNetv2 checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(f"{path}: not a readable torch checkpoint ({type(exc).__name__}: {exc})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelError(f"{path}: expected a state dict, got {type(state).__name__}")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    found = _espnet_scale(state, str(path))
    if s is not None and abs(found - s) > 1e-6:
        raise ModelError(f"{path}: checkpoint has width scale s={found:g}, but s={s:g} was asked for")
    classes = state.get("bu_dec_l4.merge_layer.3.bias")
    net = ESPNetv2Seg(found, classes=int(classes.shape[0]) if classes is not None else 20)
    want = net.state_dict()
    missing = sorted(set(want) - set(state))
    unexpected = sorted(set(state) - set(want))
    wrong = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in want.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        parts = [
            f"{len(missing)} missing keys (e.g. {missing[:3]})" if missing else "",
            f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})" if unexpected else "",
            f"{len(wrong)} shape mismatches (checkpoint vs model, e.g. {wrong[:3]})" if wrong else "",
        ]
        raise ModelError(f"{path}: does not fit ESPNetv2 (s={found:g}): " + "; ".join(p for p in parts if p))
    net.load_state_dict(state, strict=True)
    return net.eval()


class ESPNetv2Segmenter(TorchSegmenter):
    """ESPNetv2 trained on Cityscapes (``espnetv2_s_<s>_city_1024x512.pth``): 19 classes + background.

    Input: RGB in [0, 1] normalised with the ImageNet mean/std (as in training), resized to ``input_size``
    (H, W) or, by default, to ``width`` pixels wide with the image's aspect ratio (height rounded to a
    multiple of 32; the network was trained on 1024x512 crops).
    """

    def __init__(
        self,
        weights: str | os.PathLike,
        *,
        s: float | None = None,
        width: int = 1024,
        input_size: tuple[int, int] | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__(device=device)
        self.net = load_espnetv2(weights, s=s).to(self.device)
        self.s = self.net.base_net.channels[1] / 64.0
        self.width = int(width)
        self.fixed_size = tuple(input_size) if input_size else None
        n = self.net.bu_dec_l4.merge_layer[3].out_channels
        self.classes = (
            CITYSCAPES_CLASSES if n == len(CITYSCAPES_CLASSES) else tuple(f"class{i}" for i in range(n))
        )
        size = f"{self.fixed_size[0]}x{self.fixed_size[1]}" if self.fixed_size else f"w{self.width}"
        self.id = f"espnetv2_s{self.s:g}_city_{size}"

    def input_size(self, h: int, w: int) -> tuple[int, int]:
        if self.fixed_size:
            return self.fixed_size  # type: ignore[return-value]
        return max(64, int(round(self.width * h / w / 32)) * 32), self.width

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# --------------------------------------------------------------------------- other sources


def read_label_map(path: str | os.PathLike) -> np.ndarray:
    """A single-channel uint8 PNG of class indices (raises ImageError when it is not one)."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: no such label map")
    data = np.fromfile(path, dtype=np.uint8)
    check_encoded_size(data, name=str(path))
    try:
        labels = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    except cv2.error:
        labels = None
    if labels is None or labels.ndim != 2 or labels.dtype != np.uint8:
        shape = None if labels is None else (labels.shape, labels.dtype)
        raise ImageError(f"{path}: not a single-channel 8-bit label map ({shape})")
    return labels


def write_label_map(path: str | os.PathLike, labels: np.ndarray) -> Path:
    """Write a (H, W) uint8 class map as a lossless PNG, atomically."""
    if labels.ndim != 2 or labels.dtype != np.uint8:
        raise ImageError(f"label maps are (H, W) uint8, got {labels.shape} {labels.dtype}")
    ok, buf = cv2.imencode(".png", labels)
    if not ok:
        raise ImageError(f"{path}: PNG encoding failed")
    return write_file_checked(path, buf.tobytes())  # atomic; OutputError on a full disk, no partial file


class LabelFolderSegmenter(Segmenter):
    """Precomputed label maps: for image ``root_images/a/b.jpg`` the map ``root/a/b.png`` (relative layout)
    or, without ``image_root``, ``root/b.png`` (by file stem). Maps are resized (nearest) to the image."""

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        classes: Sequence[str] = CITYSCAPES_CLASSES,
        image_root: str | os.PathLike | None = None,
        suffix: str = ".png",
        id: str | None = None,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(f"{self.root}: label-map folder not found")
        self.image_root = Path(image_root).resolve() if image_root else None
        self.suffix = suffix
        self.classes = tuple(classes)
        self.id = id or f"labels_{re.sub(r'[^A-Za-z0-9_.-]', '_', self.root.name)}"

    def label_path(self, image_path: str | os.PathLike) -> Path:
        p = Path(image_path)
        if self.image_root is not None:
            try:
                rel = p.resolve().relative_to(self.image_root)
            except ValueError:
                raise DatasetError(f"{p}: not under the image root {self.image_root}") from None
            return (self.root / rel).with_suffix(self.suffix)
        return self.root / f"{p.stem}{self.suffix}"

    def segment(self, image: np.ndarray) -> np.ndarray:
        raise DatasetError("a label-folder source reads maps by image path: use segment_file(path)")

    def segment_file(self, path: str | os.PathLike) -> np.ndarray:
        labels = read_label_map(self.label_path(path))
        if int(labels.max(initial=0)) >= len(self.classes) and labels.max() != 255:
            raise DatasetError(
                f"{self.label_path(path)}: class {int(labels.max())} beyond the "
                f"{len(self.classes)} classes of {self.id}"
            )
        h, w = _image_shape(path)
        if labels.shape != (h, w):
            labels = cv2.resize(labels, (w, h), interpolation=cv2.INTER_NEAREST)
        return labels


def _image_shape(path: str | os.PathLike) -> tuple[int, int]:
    return load_image(path).shape[:2]


class TorchvisionSegmenter(TorchSegmenter):
    """Plug for a torchvision segmentation model (e.g. ``lraspp_mobilenet_v3_large``), weights through
    torchvision's weights API (``weights="DEFAULT"`` needs them in ``$TORCH_HOME``; no download here is
    attempted beyond torchvision's own). Classes come from the weights' metadata."""

    def __init__(
        self,
        name: str,
        *,
        weights: str | None = "DEFAULT",
        num_classes: int | None = None,
        short_side: int = 520,
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__(device=device)
        # torchvision segmenters: only when chosen
        from torchvision.models import get_model, get_model_weights

        try:
            enum = get_model_weights(name)
            w = None if not weights else (enum.DEFAULT if weights == "DEFAULT" else enum[weights])
            kw: dict = {"num_classes": num_classes} if num_classes else {}
            if w is None:
                kw["weights_backbone"] = None  # a random model must not fetch backbone weights either
            with weights_only_loads():  # torchvision would unpickle the cached weights file
                self.net = get_model(name, weights=w, **kw).eval().to(self.device)
        except Exception as exc:
            raise ModelError(f"torchvision segmentation model {name!r} ({weights}): {exc}") from None
        cats = w.meta.get("categories") if w is not None else None
        n = num_classes or (len(cats) if cats else 21)
        self.classes = tuple(cats) if cats else tuple(f"class{i}" for i in range(n))
        self.short_side = int(short_side)
        self.id = f"tv_{name}_{weights or 'random'}_{self.short_side}"

    def input_size(self, h: int, w: int) -> tuple[int, int]:
        f = self.short_side / min(h, w)
        return max(32, round(h * f)), max(32, round(w * f))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)["out"]


class TransformersSegmenter(TorchSegmenter):
    """Plug for a Hugging Face semantic-segmentation model (e.g. a SegFormer fine-tuned on Cityscapes) from
    a local folder or the local cache only (``local_files_only``): no hub download at run time."""

    def __init__(
        self, name_or_path: str, *, size: tuple[int, int] = (512, 1024), device: str | torch.device = "cpu"
    ) -> None:
        try:
            # optional: HuggingFace segmenters only when chosen
            from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation
        except ImportError:
            raise ModelError("TransformersSegmenter needs the 'transformers' package") from None
        try:
            proc = AutoImageProcessor.from_pretrained(name_or_path, local_files_only=True)
            net = AutoModelForSemanticSegmentation.from_pretrained(name_or_path, local_files_only=True)
        except Exception as exc:
            raise ModelError(
                f"{name_or_path}: cannot load a local transformers segmentation model: {exc}"
            ) from None
        super().__init__(device=device, mean=tuple(proc.image_mean), std=tuple(proc.image_std))
        self.net = net.eval().to(self.device)
        self.size = tuple(size)
        labels = net.config.id2label
        self.classes = tuple(labels[i] for i in sorted(labels))
        self.id = f"hf_{re.sub(r'[^A-Za-z0-9_.-]', '_', name_or_path)}_{size[0]}x{size[1]}"

    def input_size(self, h: int, w: int) -> tuple[int, int]:
        return self.size  # type: ignore[return-value]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(pixel_values=x).logits


# --------------------------------------------------------------------------- the cache


class LabelCache:
    """Label maps on disk: ``root/<segmenter id>/<key>.png``, key = hash of (resolved path, size, mtime)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def path(self, image_path: str | os.PathLike, segmenter_id: str) -> Path:
        p = Path(image_path).resolve()
        try:
            st = p.stat()
        except OSError:
            raise ImageError(f"{p}: no such image file") from None
        key = hashlib.sha1(f"{p}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:20]
        safe_id = re.sub(r"[^A-Za-z0-9_.-]", "_", segmenter_id)
        name = f"{safe_id}/{p.stem[:40]}-{key}.png"
        confined_path(self.root, name)  # an id of "." or ".." must not write beside the cache
        return self.root / name

    def get(self, image_path: str | os.PathLike, segmenter: Segmenter) -> np.ndarray:
        """The cached map, computed and stored first if missing."""
        target = self.path(image_path, segmenter.id)
        if target.is_file():
            return read_label_map(target)
        labels = segmenter.segment_file(image_path)
        write_label_map(target, labels)
        return labels


def segment_files(
    paths: Sequence[str | os.PathLike], segmenter: Segmenter, cache: LabelCache, *, progress: bool = True
) -> list[Path]:
    """The offline pass: make sure every image has a cached label map; returns the map files in order."""
    out = []
    computed = 0
    for p in tqdm(paths, desc=f"segment {segmenter.id}", unit="img", disable=not progress):
        target = cache.path(p, segmenter.id)
        if not target.is_file():
            write_label_map(target, segmenter.segment_file(p))
            computed += 1
        out.append(target)
    log.info(
        "%s: %d label maps computed, %d from the cache %s",
        segmenter.id,
        computed,
        len(out) - computed,
        cache.root,
    )
    return out
