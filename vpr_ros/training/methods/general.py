"""A general low-quality student: LoQI distillation from the ImageNet-initialised model, over random links.

The packaged domain students (Nordland LoQI, KITTI StructVPR) are fine-tuned on a few thousand frames of
one domain and lose what the ImageNet backbone knew elsewhere. This recipe keeps it: the teacher is the
frozen ImageNet-initialised model at the deployment size (240x320 by default), the student starts as a
copy of it, and every training image is sent through a random link (JPEG q 5-50, resolution 1/4-1/2,
H.264 / H.265 QP 30-50, or clean) before the student sees it (``links.gray`` of the images are made
grayscale first, for both, as from a monochrome camera). The student is distilled to the teacher's
view of the high-quality image with the LoQI losses (:class:`~vpr_ros.training.methods.loqi.LoQI`: ICKD on the
latent maps + MSE on the descriptor); no labels are used, so any image may train it. Clean images are in
the mix (student input = teacher input, loss 0 at the start) so the clean descriptor is held in place,
and the student's BatchNorm statistics stay the teacher's (``model.freeze_bn``).

Cost control on CPU:

* the links are encoded once per (image, draw) and cached (:class:`PairStore`, deterministic by seed):
  ``data.draws`` received versions per image, epoch ``e`` uses draw ``e mod draws``;
* the model sees a random ``model.crop`` window of the deployment-size input, the same window for teacher
  and student: the pixel scale (and so the size of JPEG blocks and blur relative to the network) is the
  deployment's, at a fraction of the cost of the whole frame.

Validation (``val.csv``): a fixed set of pool images held out of training, at the full input size:
``cos_clean`` (student vs teacher on the clean image: drift), ``cos_lq`` (student on the link vs teacher
on the clean image) and ``self_r1_lq`` (each received image finds its own clean original among the
validation images, student descriptors), with the teacher's ``cos_lq`` / ``self_r1_lq`` as reference.

    vpr-ros train --config training/general_student.yaml --threads 2
    vpr-ros export runs/general_student/last.pt student.pt     # with its model card (and OUT.json)
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from vpr_ros.core.errors import ConfigError, DatasetError
from vpr_ros.core.fileio import atomic_path, atomic_write_text, remove_stale_temps
from vpr_ros.core.models import read_checkpoint
from vpr_ros.core.models.registry import VprModel
from vpr_ros.core.preprocess import resize_rgb, to_tensor_batch
from vpr_ros.core.transmission import TransmissionConfig, received_image
from vpr_ros.data.bags import read_image_bag
from vpr_ros.data.files import IMAGE_SUFFIXES
from vpr_ros.data.places import (
    ImageRecord,
    load_ie_tower,
    load_kitti,
    load_nordland,
    load_rtabmap_loop,
)
from vpr_ros.training.config import (
    OptimConfig,
    RunConfig,
    ScheduleConfig,
    SplitConfig,
    build_config,
    check,
    validate_loop,
)
from vpr_ros.training.data import MemoryImageRecord, sample_rng
from vpr_ros.training.engine import Method, Trainer, TrainResult, run_trainer
from vpr_ros.training.export import export_deployed
from vpr_ros.training.methods.loqi import (
    LOSS_TERMS,
    LoQI,
    LossConfig,
    ModelConfig,
    load_branch,
    validate_loss,
)
from vpr_ros.training.synthetic import dead_leaves_records

log = logging.getLogger("vpr_ros.training.methods.general")

SOURCE_KINDS = ("nordland", "ie_tower", "kitti", "rtabmap_loop", "images", "bags", "dead_leaves")
#: The domain (dataset family) each source kind belongs to; ``images`` / ``bags`` name theirs.
KIND_DOMAIN = {k: k for k in ("nordland", "ie_tower", "kitti", "rtabmap_loop", "dead_leaves")}
LINK_KINDS = ("clean", "jpeg", "resize", "h264", "h265")
STORE_VERSION = 1


# --------------------------------------------------------------------------- recipe


@dataclass
class SourceConfig:
    """One image source of the training pool. Images are used without labels.

    ``every`` / ``offset``: records ``[offset::every]`` of each list (Nordland: of each season; IE tower: of
    gallery and queries; KITTI: of each sequence). ``exclude_split``: Nordland places to leave out (the
    held-out blocks of a place split and ``gap`` frames around them). ``dead_leaves``: ``count``
    procedural images of ``size`` from ``seed`` (``training/synthetic.py``; no ``root``).
    """

    kind: str = "nordland"
    root: str = ""
    every: int = 1
    offset: int = 0
    limit: int | None = None  # at most this many images from the source (after every/offset)
    seasons: list[str] = field(default_factory=lambda: ["summer", "winter"])  # nordland
    exclude_split: SplitConfig | None = None  # nordland
    sequences: list[str] = field(default_factory=lambda: ["05"])  # kitti
    bags: list[str] = field(default_factory=list)  # bags: rosbag2 folders relative to root
    image_topic: str = "/camera/image_raw"  # bags
    domain: str = ""  # images / bags: the domain name on the model card (default: the folder name)
    count: int = 1000  # dead_leaves: how many images
    size: list[int] = field(default_factory=lambda: [240, 320])  # dead_leaves: [H, W]
    seed: int = 0  # dead_leaves


@dataclass
class PoolConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    draws: int = 2  # received versions (link draws) per image; epoch e uses draw e mod draws
    val_every: int = 40  # every val_every-th pool image is held out for validation
    store: str = ".cache/general_pairs"  # pre-encoded pairs (keyed by a hash of what produced them)
    workers: int = 0


@dataclass
class LinkMixConfig:
    """The random link of each (image, draw): a kind by weight, then its parameter uniformly in range."""

    clean: float = 0.2
    jpeg: float = 0.2
    resize: float = 0.2
    h264: float = 0.2
    h265: float = 0.2
    jpeg_quality: list[int] = field(default_factory=lambda: [5, 50])
    resize_scale: list[float] = field(default_factory=lambda: [0.25, 0.5])
    qp: list[int] = field(default_factory=lambda: [30, 50])
    # share of the pool's images made grayscale (3 equal channels) before the teacher and the link see them:
    # many robot cameras are monochrome, and a link's artefacts differ without colour (no chroma planes)
    gray: float = 0.0
    # the camera the link serves: each received frame is sent at s x the model input size (s uniform in
    # [lo, hi] per (image, draw)), as from a camera larger than the model input (640x480 for a 240x320
    # model: s = 2), so a link's artefacts (JPEG blocks, macroblocks, a resize's blur) reach the model at
    # the deployment's scale. null: the pool image at its own size (images smaller than the input then show
    # the artefacts magnified, Nordland's 64x32 frames 5-7x)
    camera_scale: list[float] | None = None

    def weights(self) -> np.ndarray:
        w = np.array([getattr(self, k) for k in LINK_KINDS], dtype=np.float64)
        return w / w.sum()

    def draw(self, rng: np.random.Generator) -> str:
        """One link spec (``none``, ``jpeg:Q``, ``resize:S``, ``h264:QP``, ``h265:QP``)."""
        kind = LINK_KINDS[int(rng.choice(len(LINK_KINDS), p=self.weights()))]
        if kind == "clean":
            return "none"
        if kind == "jpeg":
            return f"jpeg:{int(rng.integers(self.jpeg_quality[0], self.jpeg_quality[1] + 1))}"
        if kind == "resize":
            return f"resize:{rng.uniform(self.resize_scale[0], self.resize_scale[1]):.3f}"
        return f"{kind}:{int(rng.integers(self.qp[0], self.qp[1] + 1))}"

    def draw_camera(self, rng: np.random.Generator) -> float | None:
        """The camera scale of one received frame (after :meth:`draw`, from the same generator), or None."""
        if self.camera_scale is None:
            return None
        return float(rng.uniform(self.camera_scale[0], self.camera_scale[1]))

    def label(self) -> str:
        parts = [f"clean {self.clean:g}"]
        if self.jpeg:
            parts.append(f"jpeg q{self.jpeg_quality[0]}-{self.jpeg_quality[1]} {self.jpeg:g}")
        if self.resize:
            parts.append(f"resize {self.resize_scale[0]:g}-{self.resize_scale[1]:g} {self.resize:g}")
        for k in ("h264", "h265"):
            if getattr(self, k):
                parts.append(f"{k} qp{self.qp[0]}-{self.qp[1]} {getattr(self, k):g}")
        extra = f"; {self.gray:g} of the images grayscale" if self.gray else ""
        if self.camera_scale is not None:
            extra += f"; sent at {self.camera_scale[0]:g}-{self.camera_scale[1]:g}x the input size"
        return "random link: " + ", ".join(parts) + extra

    def is_gray(self, seed: int, image: int) -> bool:
        """Whether pool image ``image`` is made grayscale (the same for its clean view and every draw)."""
        return self.gray > 0 and bool(np.random.default_rng([int(seed) & 0xFFFFFFFF, 11, int(image)]).random()
                                      < self.gray)


@dataclass
class GeneralModelConfig:
    name: str = "structvpr_mobilenetv2"
    input_size: list[int] = field(default_factory=lambda: [240, 320])  # [H, W]: the deployment size
    teacher: str = "imagenet"  # imagenet | a checkpoint of model.name
    crop: list[int] | None = field(default_factory=lambda: [128, 160])  # training window; null: whole input
    flip: float = 0.0  # share of training items mirrored left-right (teacher and student alike)
    freeze_bn: bool = True  # keep the student's BatchNorm statistics (the teacher's)
    freeze: list[str] = field(default_factory=list)  # parameter-name prefixes kept fixed


@dataclass
class GeneralConfig:
    data: PoolConfig = field(default_factory=PoolConfig)
    model: GeneralModelConfig = field(default_factory=GeneralModelConfig)
    links: LinkMixConfig = field(default_factory=LinkMixConfig)
    # the LoQI terms and their paper defaults (loqi.py, config.LossConfig); no triplet: no labels here
    loss: LossConfig = field(default_factory=lambda: LossConfig(triplet=False))
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    run: RunConfig = field(default_factory=lambda: RunConfig(dir="runs/general_student"))


def validate_general(cfg: GeneralConfig) -> GeneralConfig:
    """Range and consistency checks of a general-student recipe; raises ConfigError naming the key."""
    d, m, lk = cfg.data, cfg.model, cfg.links
    check(bool(m.name), "model.name", "a registered model name is required")
    check(bool(d.sources), "data.sources", "list at least one image source")
    for i, s in enumerate(d.sources):
        where = f"data.sources[{i}]"
        check(s.kind in SOURCE_KINDS, f"{where}.kind", f"{s.kind!r} is not one of {', '.join(SOURCE_KINDS)}")
        check(bool(s.root) or s.kind == "dead_leaves", f"{where}.root", "the source folder is required")
        check(s.kind != "dead_leaves" or s.count >= 1, f"{where}.count", f"must be >= 1, got {s.count}")
        check(s.kind != "dead_leaves" or (len(s.size) == 2 and min(s.size) >= 16), f"{where}.size",
              f"must be [H, W] with H, W >= 16, got {s.size}")
        check(s.every >= 1, f"{where}.every", f"must be >= 1, got {s.every}")
        check(0 <= s.offset < s.every, f"{where}.offset", f"must be in 0..{s.every - 1}, got {s.offset}")
        check(s.limit is None or s.limit >= 1, f"{where}.limit", f"must be >= 1 or null, got {s.limit}")
        check(s.kind != "bags" or bool(s.bags), f"{where}.bags", "list at least one bag")
    check(d.draws >= 1, "data.draws", f"must be >= 1, got {d.draws}")
    check(d.val_every >= 2, "data.val_every", f"must be >= 2, got {d.val_every}")
    check(d.workers >= 0, "data.workers", f"must be >= 0, got {d.workers}")
    check(len(m.input_size) == 2 and min(m.input_size) >= 32, "model.input_size",
          f"must be [H, W] with H, W >= 32, got {m.input_size}")
    check(0 <= m.flip <= 1, "model.flip", f"must be within 0..1, got {m.flip}")
    if m.crop is not None:
        check(len(m.crop) == 2 and 32 <= m.crop[0] <= m.input_size[0] and 32 <= m.crop[1] <= m.input_size[1],
              "model.crop", f"must be [h, w] within model.input_size {m.input_size}, >= 32, got {m.crop}")
    w = [getattr(lk, k) for k in LINK_KINDS]
    check(min(w) >= 0 and sum(w) > 0, "links", "weights must be >= 0 and not all 0")
    check(len(lk.jpeg_quality) == 2 and 1 <= lk.jpeg_quality[0] <= lk.jpeg_quality[1] <= 100,
          "links.jpeg_quality", f"must be [lo, hi] within 1..100, got {lk.jpeg_quality}")
    check(len(lk.resize_scale) == 2 and 0 < lk.resize_scale[0] <= lk.resize_scale[1] <= 1,
          "links.resize_scale", f"must be [lo, hi] within (0, 1], got {lk.resize_scale}")
    check(len(lk.qp) == 2 and 0 <= lk.qp[0] <= lk.qp[1] <= 51, "links.qp",
          f"must be [lo, hi] within 0..51, got {lk.qp}")
    check(0 <= lk.gray <= 1, "links.gray", f"must be within 0..1, got {lk.gray}")
    check(lk.camera_scale is None or (len(lk.camera_scale) == 2 and 0.25 <= lk.camera_scale[0]
                                      <= lk.camera_scale[1] <= 8), "links.camera_scale",
          f"must be null or [lo, hi] within 0.25..8, got {lk.camera_scale}")
    check(cfg.loss.ickd or cfg.loss.mse, "loss", "enable loss.ickd or loss.mse")
    check(not cfg.loss.triplet, "loss.triplet", "the pool has no labels: the triplet loss cannot be used")
    check(not cfg.loss.cache_teacher, "loss.cache_teacher",
          "the teacher sees a new random crop each epoch, so its outputs cannot be cached")
    validate_loss(cfg.loss)
    validate_loop(cfg.optim, cfg.schedule, cfg.run)
    return cfg


# --------------------------------------------------------------------------- the image pool


def source_domain(src: SourceConfig) -> str:
    """The dataset family a source belongs to (model cards: in or out of domain)."""
    return src.domain or KIND_DOMAIN.get(src.kind) or Path(src.root).name


def _nordland_kept(frame: int | None, split: SplitConfig | None) -> bool:
    """A Nordland frame outside the held-out blocks of ``split`` and ``split.gap`` frames around them."""
    if split is None or frame is None:
        return True
    lo, hi = int((frame - split.gap) // split.block), int((frame + split.gap) // split.block)
    return all(b % split.val_every != split.val_offset for b in range(lo, hi + 1))


def source_records(src: SourceConfig) -> list[ImageRecord]:
    """The images of one pool source (in a fixed order)."""
    root = Path(src.root)
    pick = slice(src.offset, None, src.every)
    if src.kind == "nordland":
        if len(src.seasons) != 2:
            raise ConfigError(f"nordland source {root}: seasons must name two seasons, got {src.seasons}")
        ds = load_nordland(root, database_season=src.seasons[0], query_season=src.seasons[1])
        lists = [ds.database, ds.queries]
        lists = [[r for r in rs if _nordland_kept(r.frame_index, src.exclude_split)] for rs in lists]
    elif src.kind == "ie_tower":
        ds = load_ie_tower(root)
        lists = [ds.database, ds.queries]
    elif src.kind == "kitti":
        lists = [load_kitti(root, seq).database for seq in src.sequences]
    elif src.kind == "rtabmap_loop":
        lists = [load_rtabmap_loop(root).database]
    elif src.kind == "dead_leaves":
        lists = [list(dead_leaves_records(src.count, seed=src.seed, size=(src.size[0], src.size[1])))]
    elif src.kind == "images":
        if not root.is_dir():
            raise DatasetError(f"{root}: image folder not found")
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        lists = [[ImageRecord(path=p, name=str(p.relative_to(root))) for p in files]]
    else:  # bags: every frame of each bag, no positions needed
        lists = []
        for b in src.bags:
            frames = read_image_bag(root / b, src.image_topic, None, require_positions=False)
            lists.append([MemoryImageRecord(path=root / b, name=f"{b}@{f.stamp:.3f}", stamp=f.stamp,
                                            image=f.image) for f in frames])
    out = [r for rs in lists for r in rs[pick]][: src.limit]
    if not out:
        raise DatasetError(f"{src.kind} source {root}: no images left after every/offset/exclusions")
    return out


@dataclass
class ImagePool:
    """Unlabelled images (the engine asks a place set for ``name`` and ``summary()``)."""

    name: str
    records: list[ImageRecord]
    per_source: dict[str, int]

    def summary(self) -> str:
        return f"{self.name}: {len(self.records)} images (" + ", ".join(
            f"{k} {n}" for k, n in self.per_source.items()) + ")"


def build_pool(cfg: PoolConfig) -> tuple[ImagePool, ImagePool]:
    """(training, validation) pools: every ``val_every``-th image of the pool (from the middle of the
    first stride) is validation."""
    train: list[ImageRecord] = []
    val: list[ImageRecord] = []
    n_train: dict[str, int] = {}
    n_val: dict[str, int] = {}
    for src in cfg.sources:
        recs = source_records(src)
        name = f"{source_domain(src)}"
        is_val = [(i % cfg.val_every) == cfg.val_every // 2 for i in range(len(recs))]
        train += [r for r, v in zip(recs, is_val, strict=True) if not v]
        val += [r for r, v in zip(recs, is_val, strict=True) if v]
        n_train[name] = n_train.get(name, 0) + sum(not v for v in is_val)
        n_val[name] = n_val.get(name, 0) + sum(is_val)
    return ImagePool("pool/train", train, n_train), ImagePool("pool/val", val, n_val)


# --------------------------------------------------------------------------- pre-encoded pairs


def to_gray_rgb(image: np.ndarray) -> np.ndarray:
    """RGB uint8 -> its luma (ITU-R BT.601) in three equal channels, uint8."""
    y = image[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return np.repeat(np.clip(np.rint(y), 0, 255).astype(np.uint8)[..., None], 3, axis=-1)


def receive(image: np.ndarray, spec: str) -> np.ndarray:
    """``image`` as received over the link ``spec`` (at its own resolution); the image itself for ``none``."""
    return received_image(image, TransmissionConfig.parse(spec))


def pair_rng(seed: int, image: int, draw: int) -> np.random.Generator:
    """The generator of one (image, draw): depends only on the seed, the image's pool index and the draw."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, 7, int(image), int(draw)])


class PairStore:
    """High-quality images and their received versions at the model input size, encoded once.

    ``hq``: (N, H, W, 3) uint8, each pool image resized to the input size (what the teacher sees);
    ``lq``: (N, draws, H, W, 3) uint8, the image sent through the link of (seed, image, draw) at its own
    resolution (or at ``links.camera_scale`` x the input size) and the received frame resized to the input
    size (what the student sees); ``specs``: the links (``spec@S x`` with a camera scale).
    Saved as .npy files (read memory-mapped) in ``root/<key>``, ``key`` a hash of the records,
    size, draws, seed and link mix; a store killed while being written is rebuilt (no ``done.json``).
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        info = json.loads((folder / "done.json").read_text())
        self.specs: list[list[str]] = info["specs"]
        self.names: list[str] = info["names"]
        self.hq = np.load(folder / "hq.npy", mmap_mode="r")
        self.lq = np.load(folder / "lq.npy", mmap_mode="r")

    def __len__(self) -> int:
        return len(self.names)

    @staticmethod
    def key(records: Sequence[ImageRecord], size: Sequence[int], draws: int, seed: int,
            mix: LinkMixConfig) -> str:
        links = dataclasses.asdict(mix)
        for opt in ("gray", "camera_scale"):  # stores built before an option keep their key
            if not links[opt]:
                links.pop(opt)
        text = json.dumps([STORE_VERSION, [f"{r.path}|{r.name}" for r in records], list(size), draws, seed,
                           links])
        return hashlib.sha1(text.encode()).hexdigest()[:16]

    @classmethod
    def build(cls, records: Sequence[ImageRecord], *, size: Sequence[int], draws: int, seed: int,
              mix: LinkMixConfig, root: str | os.PathLike, progress: bool = True,
              desc: str = "encode links") -> PairStore:
        """The store of ``records`` (built unless cached)."""
        folder = Path(root) / cls.key(records, size, draws, seed, mix)
        if (folder / "done.json").is_file():
            return cls(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("hq", "lq"):  # the temporary files of a build that was killed
            remove_stale_temps(folder / f"{name}.npy")
        h, w = int(size[0]), int(size[1])
        n = len(records)
        specs: list[list[str]] = []
        paths = {name: folder / f"{name}.npy" for name in ("hq", "lq")}
        with atomic_path(paths["hq"]) as tmp_hq, atomic_path(paths["lq"]) as tmp_lq:
            hq = np.lib.format.open_memmap(tmp_hq, mode="w+", dtype=np.uint8, shape=(n, h, w, 3))
            lq = np.lib.format.open_memmap(tmp_lq, mode="w+", dtype=np.uint8, shape=(n, draws, h, w, 3))
            for i, rec in enumerate(tqdm(records, desc=desc, unit="image", disable=not progress)):
                image = rec.load()
                if mix.is_gray(seed, i):
                    image = to_gray_rgb(image)
                hq[i] = resize_rgb(image, (h, w))
                row = []
                for d in range(draws):
                    rng = pair_rng(seed, i, d)
                    spec = mix.draw(rng)
                    scale = mix.draw_camera(rng) if spec != "none" else None
                    if scale is None:
                        frame, label = image, spec
                    else:
                        frame = resize_rgb(image, (round(scale * h), round(scale * w)))
                        label = f"{spec}@{scale:.2f}x"
                    row.append(label)
                    lq[i, d] = resize_rgb(receive(frame, spec), (h, w))
                specs.append(row)
            hq.flush()
            lq.flush()
            del hq, lq
        atomic_write_text(folder / "done.json", json.dumps(
            {"names": [r.name for r in records], "specs": specs, "size": [h, w], "draws": draws,
             "seed": seed, "links": dataclasses.asdict(mix)}) + "\n")
        return cls(folder)


class LinkPairs(torch.utils.data.Dataset):
    """Training items ``{"hq": (1, 3, h, w), "lq": (1, 3, h, w), "ids": (1,), "index": k}``: image ``k``
    of the store, its received version of draw ``epoch mod draws``, the same random ``crop`` window of
    both (from generator (seed, epoch, k)); ``hq`` / ``lq`` as the model input (normalised)."""

    # the teacher's input (a random crop) differs between epochs: its outputs cannot be cached per image
    deterministic_hq = False

    def __init__(self, store: PairStore, *, preprocess: Any, crop: Sequence[int] | None, seed: int,
                 flip: float = 0.0) -> None:
        self.store, self.seed, self.epoch, self.flip = store, int(seed), 0, float(flip)
        size = store.hq.shape[1:3]
        self.crop = (int(crop[0]), int(crop[1])) if crop else (int(size[0]), int(size[1]))
        self.preprocess = dataclasses.replace(preprocess, input_size=self.crop)

    def __len__(self) -> int:
        return len(self.store)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __getitem__(self, k: int) -> dict[str, Any]:
        rng = sample_rng(self.seed, self.epoch, k)
        h, w = self.store.hq.shape[1:3]
        ch, cw = self.crop
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        d = self.epoch % self.store.lq.shape[1]
        hq = np.ascontiguousarray(self.store.hq[k, y : y + ch, x : x + cw])
        lq = np.ascontiguousarray(self.store.lq[k, d, y : y + ch, x : x + cw])
        if self.flip and rng.random() < self.flip:  # no draw at flip 0: the crops of older recipes stay
            hq, lq = np.ascontiguousarray(hq[:, ::-1]), np.ascontiguousarray(lq[:, ::-1])
        return {
            "hq": to_tensor_batch([hq], self.preprocess),
            "lq": to_tensor_batch([lq], self.preprocess),
            "ids": torch.tensor([k], dtype=torch.int64),
            "index": k,
        }


# --------------------------------------------------------------------------- objective and trainer


class GeneralObjective(LoQI):
    """LoQI on (image, received image) pairs (tuples of one, no triplet); with ``freeze_bn`` the student's
    BatchNorm layers stay in eval mode (running statistics = the teacher's, never updated)."""

    def __init__(self, student: VprModel, teacher: VprModel, loss: LossConfig, *, freeze_bn: bool) -> None:
        super().__init__(student, teacher, loss)
        self.freeze_bn = freeze_bn

    def train(self, mode: bool = True) -> GeneralObjective:
        super().train(mode)
        if self.freeze_bn:
            for m in self.student.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self


def pool_card(cfg: GeneralConfig, n_images: int) -> dict[str, Any]:
    """The training-data part of the model card (``meta["card"]``) this recipe produces (``n_images``: the
    training pool's size); the input size is the checkpoint's preprocessing, not repeated here."""
    domains = list(dict.fromkeys(source_domain(s) for s in cfg.data.sources))
    h, w = cfg.model.input_size
    parts = []
    for s in cfg.data.sources:
        what = {"nordland": f"Nordland {'+'.join(s.seasons)}", "ie_tower": "IE tower",
                "kitti": f"KITTI {'+'.join(s.sequences)}", "rtabmap_loop": "RTAB-Map loop",
                "dead_leaves": f"{s.count} dead-leaves images {s.size[0]}x{s.size[1]} (synthetic, seed "
                               f"{s.seed})"}.get(
                    s.kind, f"{s.kind} {Path(s.root).name}")
        if s.every > 1:
            what += f" (one image in {s.every}, from index {s.offset})"
        if s.exclude_split is not None:
            sp = s.exclude_split
            what += (f" without the held-out places (block {sp.val_offset} of every {sp.val_every} blocks of "
                     f"{sp.block:g} frames, +-{sp.gap:g} frames)")
        parts.append(what)
    return {
        "key": "general",
        "title": f"general low-quality student: LoQI-distilled from the ImageNet student at {h}x{w} over "
                 "random links",
        "train_data": "; ".join(parts) + f": {n_images} images, no labels",
        "train_images": n_images,
        "train_domains": domains,
        "train_sets": [],
        "teacher": f"{cfg.model.teacher} {cfg.model.name} at {h}x{w} (frozen)",
        "links": cfg.links.label(),
    }


class GeneralTrainer(Trainer):
    """The engine's loop with this method's hooks: pool images, pre-encoded link pairs, LoQI objective,
    agreement validation."""

    cfg: GeneralConfig
    method = "general"
    loss_terms = LOSS_TERMS

    def build_places(self) -> tuple[ImagePool, ImagePool]:
        return build_pool(self.cfg.data)

    def build_models(self) -> tuple[VprModel, VprModel]:
        m = self.cfg.model
        mc = ModelConfig(name=m.name, input_size=list(m.input_size), teacher=m.teacher, init="teacher")
        teacher = load_branch(m.teacher, mc, role="teacher")
        student = copy.deepcopy(teacher)
        names = [n for n, _ in student.named_parameters()]
        for prefix in m.freeze:
            if not any(n.startswith(prefix) for n in names):
                raise ConfigError(f"model.freeze: prefix {prefix!r} matches no parameter of {m.name}")
        for n, p in student.named_parameters():
            if any(n.startswith(prefix) for prefix in m.freeze):
                p.requires_grad_(False)
        return student, teacher

    def _store(self, pool: ImagePool, seed: int, desc: str) -> PairStore:
        cfg = self.cfg
        return PairStore.build(pool.records, size=cfg.model.input_size, draws=cfg.data.draws, seed=seed,
                               mix=cfg.links, root=cfg.data.store, progress=cfg.run.progress, desc=desc)

    def build_dataset(self) -> LinkPairs:
        store = self._store(self.train_places, self.cfg.run.seed, "encode training links")
        return LinkPairs(store, preprocess=self.student.preprocess, crop=self.cfg.model.crop,
                         seed=self.cfg.run.seed, flip=self.cfg.model.flip)

    def build_objective(self) -> GeneralObjective:
        return GeneralObjective(self.student, self.teacher, self.cfg.loss,
                                freeze_bn=self.cfg.model.freeze_bn)

    def compute_loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        dev = self.dist.device
        return self.model(batch["hq"].to(dev, non_blocking=True), batch["lq"].to(dev, non_blocking=True))

    def loader_workers(self) -> int:
        return self.cfg.data.workers

    def val_columns(self) -> list[str]:
        return ["cos_clean", "cos_lq", "self_r1_lq", "teacher_cos_lq", "teacher_self_r1_lq"]

    @torch.no_grad()
    def _describe(self, model: VprModel, images: np.ndarray) -> torch.Tensor:
        bs, out = self.cfg.run.val_batch_size, []
        dev = self.dist.device
        for s in range(0, len(images), bs):
            x = to_tensor_batch(list(images[s : s + bs]), model.preprocess).to(dev)
            out.append(model(x).float().cpu())
        return torch.cat(out)

    def validate(self) -> dict[str, float]:
        """Agreement with the teacher on the held-out pool images (module docstring)."""
        if getattr(self, "_val", None) is None:
            store = self._store(self.val_places, self.cfg.run.seed + 1, "encode validation links")
            hq, lq = np.asarray(store.hq), np.asarray(store.lq[:, 0])
            t_hq, t_lq = self._describe(self.teacher, hq), self._describe(self.teacher, lq)
            self._val = (hq, lq, t_hq, t_lq)
        hq, lq, t_hq, t_lq = self._val
        was = self.student.training
        self.student.eval()
        s_hq, s_lq = self._describe(self.student, hq), self._describe(self.student, lq)
        self.student.train(was)
        ids = torch.arange(len(hq))

        def self_r1(q: torch.Tensor, db: torch.Tensor) -> float:
            return float(((q @ db.T).argmax(1) == ids).float().mean())

        self.metrics = {
            "cos_clean": float((s_hq * t_hq).sum(1).mean()),
            "cos_lq": float((s_lq * t_hq).sum(1).mean()),
            "self_r1_lq": self_r1(s_lq, s_hq),
            "teacher_cos_lq": float((t_lq * t_hq).sum(1).mean()),
            "teacher_self_r1_lq": self_r1(t_lq, t_hq),
        }
        return self.metrics

    def checkpoint_meta(self) -> dict[str, Any]:
        return {"teacher": self.cfg.model.teacher, "degradation": self.cfg.links.label(),
                "card": pool_card(self.cfg, len(self.train_places.records))}


def train_general(cfg: GeneralConfig, *, resume: bool = False) -> TrainResult:
    """Run (or, with ``resume``, continue) the recipe to its final step."""
    return run_trainer(GeneralTrainer, cfg, resume=resume)


def export_general(checkpoint: str | os.PathLike, out: str | os.PathLike, *, sidecar: bool = True) -> Path:
    """Training checkpoint -> deployed student whose ``meta["card"]`` names its training data and input size
    (the study adds the cross-domain numbers)."""
    ckpt = read_checkpoint(checkpoint)
    meta = ckpt.get("meta", {})
    if meta.get("method") != "general" or "card" not in meta:
        raise ConfigError(f"{checkpoint}: not a checkpoint of the general-student recipe")
    cfg = ckpt.get("config", {})
    n = meta["card"].get("train_images")
    if n is None:  # a card without the count holds it in its text
        found = re.search(r"(\d+) images, no labels", meta["card"].get("train_data", ""))
        n = int(found.group(1)) if found else 0
    # the card from the recipe the run used (the sections it reads: a checkpoint's config may hold others)
    recipe = build_config(GeneralConfig, {k: cfg[k] for k in ("data", "model", "links") if k in cfg})
    card = pool_card(recipe, int(n))
    extra = {"method": "general", "degradation": meta.get("degradation"), "card": card,
             "loss": cfg.get("loss", {}), "teacher": meta.get("teacher"),
             "recipe": {k: cfg.get(k) for k in ("data", "links", "model", "optim", "schedule")}}
    return export_deployed(checkpoint, out, meta=extra, sidecar=sidecar)


METHOD = Method(
    name="general",
    summary="general low-quality student: LoQI from the ImageNet model over random links, no labels",
    recipe=GeneralConfig,
    validate=validate_general,
    train=train_general,
    export=export_general,
    sidecar=True,
)

if __name__ == "__main__":
    sys.exit("python -m vpr_ros.training.methods.general moved: use `vpr-ros train --config R` and "
             "`vpr-ros export CHECKPOINT OUT`")
