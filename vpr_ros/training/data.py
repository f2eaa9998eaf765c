"""Training data: place sets from the configured source, and tuples with degraded student input.

The sources give the one place-set type, :class:`~vpr_ros.data.places.PlaceDataset`, whose ground truth
also says which database images are too close to a query to serve as its negatives (``negatives_beyond``)
and which are ignored altogether (the query's own traverse a few seconds around it, for single-traverse
bags):

* :func:`nordland_places`: frame-aligned seasons, positives within +-``pos_frames`` (the "by frame"
  ground truth), negatives beyond +-``neg_frames``;
* :func:`folder_places`: ``database/`` + ``queries/`` folders with ``@utm_e@utm_n@`` names or a CSV;
* :func:`bag_places`: recorded rosbag2 bags (images + Odometry/NavSatFix) via :mod:`vpr_ros.data.bags`;
  positives within ``pos_radius_m``, negatives beyond ``neg_radius_m``, and frames of the same bag less
  than ``min_time_gap_s`` apart never count as revisits.

:meth:`PlaceDataset.split_by_place` splits by place so validation places are never seen in training.
:class:`TupleDataset` yields (query, positive, negatives) tuples as high-quality tensors for the teacher
and degraded tensors for the student; the degradation and the sampling of each item are seeded by
(seed, epoch, index) only, so they are reproducible whatever the worker count, process count or resume
point.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from vpr_ros.core.errors import DatasetError
from vpr_ros.core.models.registry import Preprocess
from vpr_ros.core.preprocess import to_tensor_batch
from vpr_ros.core.transmission import TransmissionConfig, received_image
from vpr_ros.data.bags import read_image_bag
from vpr_ros.data.places import GroundTruth, ImageRecord, PlaceDataset, load_image_folder, load_nordland
from vpr_ros.training.config import DataConfig

log = logging.getLogger(__name__)


@dataclass
class MemoryImageRecord(ImageRecord):
    """An image record whose pixels are held in memory (frames read from a bag)."""

    image: np.ndarray | None = None

    def load(self) -> np.ndarray:
        if self.image is None:
            return super().load()
        return self.image


# --------------------------------------------------------------------------- sources


def nordland_places(
    root: str | Path,
    *,
    query_season: str = "winter",
    database_season: str = "summer",
    pos_frames: int = 2,
    neg_frames: int = 10,
    limit: int | None = None,
) -> PlaceDataset:
    """Nordland (core loader, dark and frozen frames dropped; the first ``limit`` places when given):
    frame-aligned positives."""
    ds = load_nordland(root, database_season=database_season, query_season=query_season, limit=limit)
    return replace(ds, ground_truth=GroundTruth("frame", tolerance=pos_frames, negatives_beyond=neg_frames))


def folder_places(
    root: str | Path,
    *,
    positions_csv: str | Path | None = None,
    pos_radius_m: float = 10.0,
    neg_radius_m: float = 25.0,
) -> PlaceDataset:
    """An image folder (``database/``, ``queries/``; UTM names or a positions CSV): distance positives."""
    ds = load_image_folder(root, positions_csv=positions_csv, radius_m=pos_radius_m)
    gt = GroundTruth("distance", radius_m=pos_radius_m, negatives_beyond=neg_radius_m)
    return replace(ds, ground_truth=gt)


def bag_records(
    path: str | Path, *, image_topic: str, position_topic: str, max_gap_s: float = 0.2, every: int = 1
) -> list[MemoryImageRecord]:
    """Frames of one bag with a position (frames without one within ``max_gap_s`` are dropped)."""
    path = Path(path)
    frames = read_image_bag(path, image_topic, position_topic, max_gap_s=max_gap_s, every=every)
    records = [
        MemoryImageRecord(
            path=path,
            name=f"{path.name}@{f.stamp:.3f}",
            position=f.position,
            frame_index=i,
            stamp=f.stamp,
            sequence=path.name,
            image=f.image,
        )
        for i, f in enumerate(frames)
        if f.position is not None
    ]
    dropped = len(frames) - len(records)
    if dropped:
        log.info(
            "%s: %d of %d frames have no position within %.3f s and are dropped",
            path,
            dropped,
            len(frames),
            max_gap_s,
        )
    return records


def bag_places(
    bags: Sequence[str | Path],
    *,
    image_topic: str = "/camera/image_raw",
    position_topic: str = "/odom",
    pos_radius_m: float = 10.0,
    neg_radius_m: float = 25.0,
    min_time_gap_s: float = 30.0,
    max_gap_s: float = 0.2,
    every: int = 1,
) -> PlaceDataset:
    """Recorded bags: every frame is a database image and a query; revisits (within ``pos_radius_m``,
    and at least ``min_time_gap_s`` apart when in the same bag) are its positives."""
    if not bags:
        raise DatasetError("no bags given")
    records: list[ImageRecord] = []
    for b in bags:
        records.extend(
            bag_records(
                b, image_topic=image_topic, position_topic=position_topic, max_gap_s=max_gap_s, every=every
            )
        )
    name = Path(bags[0]).name if len(bags) == 1 else f"{len(bags)}_bags"
    gt = GroundTruth("distance", radius_m=pos_radius_m, negatives_beyond=neg_radius_m,
                     min_time_gap_s=min_time_gap_s)
    return PlaceDataset(name, records, records, gt)


def build_places(cfg: DataConfig) -> PlaceDataset:
    """The place set a :class:`DataConfig` describes (before the split)."""
    root = Path(cfg.root)
    if cfg.kind == "nordland":
        return nordland_places(
            root,
            query_season=cfg.query_season,
            database_season=cfg.database_season,
            pos_frames=cfg.pos_frames,
            neg_frames=cfg.neg_frames,
            limit=cfg.limit,
        )
    if cfg.kind == "folder":
        csv = None if cfg.positions_csv is None else root / cfg.positions_csv
        return folder_places(
            root, positions_csv=csv, pos_radius_m=cfg.pos_radius_m, neg_radius_m=cfg.neg_radius_m
        )
    return bag_places(
        [root / b for b in cfg.bags],
        image_topic=cfg.image_topic,
        position_topic=cfg.position_topic,
        pos_radius_m=cfg.pos_radius_m,
        neg_radius_m=cfg.neg_radius_m,
        min_time_gap_s=cfg.min_time_gap_s,
        max_gap_s=cfg.max_gap_s,
        every=cfg.bag_every,
    )


# --------------------------------------------------------------------------- degradation and tuples


class Degrader:
    """Applies one of several transmission configs per image, chosen by the caller's generator."""

    def __init__(self, specs: Sequence[str]) -> None:
        self.configs = [TransmissionConfig.parse(s) for s in specs]
        self.label = "+or+".join(c.label for c in self.configs)

    @property
    def identity(self) -> bool:
        return all(c.mode == "none" for c in self.configs)

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        cfg = self.configs[int(rng.integers(len(self.configs)))] if len(self.configs) > 1 else self.configs[0]
        return received_image(image, cfg)


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of one item: depends only on (seed, epoch, index)."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), int(index)])


class ImageCache:
    """Decoded images by record, kept in memory up to ``max_pixels`` in total."""

    def __init__(self, max_pixels: int = 400_000_000) -> None:
        self._images: dict[int, np.ndarray] = {}
        self._pixels = 0
        self.max_pixels = max_pixels

    def get(self, record: ImageRecord) -> np.ndarray:
        key = id(record)
        image = self._images.get(key)
        if image is None:
            image = record.load()
            if self._pixels + image.size <= self.max_pixels:
                self._images[key] = image
                self._pixels += image.size
        return image


class TupleDataset(Dataset):
    """(query, positive, negatives) tuples: ``{"hq": (T,3,H,W), "lq": (T,3,H,W), "ids": (T,), "index": k}``,
    T = 2 + N.

    ``hq`` is what the teacher sees (original images); ``lq`` is what the student sees (degraded by
    ``degrader``: every image, or only the query with ``targets="query"``); ``ids`` name the images
    (query i: i, database j: len(queries) + j, or j when queries and database are the same records).
    ``hq`` depends only on the image and the preprocessing (no random augmentation:
    ``deterministic_hq``), which is what makes caching the frozen teacher's outputs per id exact
    (``loss.cache_teacher``); a subclass that augments ``hq`` must set it False. Negatives are drawn from
    database images outside the query's ``near`` set: at random, or, with a descriptor cache
    (:meth:`set_cache`), the hardest ``negatives`` of ``pool`` random candidates; the positive is then the
    query's most similar positive (NetVLAD's weak supervision), else a random one.
    """

    def __init__(
        self,
        places: PlaceDataset,
        *,
        preprocess: Preprocess,
        degrader: Degrader,
        negatives: int = 4,
        targets: str = "all",
        seed: int = 0,
        pool: int = 64,
    ) -> None:
        if preprocess.input_size is None:
            raise DatasetError("training needs a fixed model input size (model.input_size)")
        self.places = places
        self.preprocess = preprocess
        self.degrader = degrader
        self.negatives = int(negatives)
        self.targets = targets
        self.seed = int(seed)
        self.pool = int(pool)
        self.epoch = 0
        self.cache = ImageCache()
        self.q_desc: np.ndarray | None = None
        self.db_desc: np.ndarray | None = None
        n_db = len(places.database)
        near = places.near()
        self.index = [
            i for i, p in enumerate(places.positives()) if len(p) and n_db - len(near[i]) >= self.negatives
        ]
        if not self.index:
            raise DatasetError(f"{places.name}: no query has a positive and {self.negatives} negatives")

    deterministic_hq = True

    def __len__(self) -> int:
        return len(self.index)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def image_ids(self, qi: int, db: Sequence[int]) -> torch.Tensor:
        """Dataset-wide ids of query ``qi`` and database records ``db``."""
        offset = 0 if self.places.database is self.places.queries else len(self.places.queries)
        return torch.tensor([qi, *(offset + int(j) for j in db)], dtype=torch.int64)

    def set_cache(self, q_desc: np.ndarray | None, db_desc: np.ndarray | None) -> None:
        """Descriptors of all queries / database images (rows as in ``places``) for hard mining."""
        self.q_desc, self.db_desc = q_desc, db_desc

    def _negatives(self, qi: int, rng: np.random.Generator) -> np.ndarray:
        near = self.places.near()[qi]
        n_db = len(self.places.database)
        want = min(self.pool if self.db_desc is not None else self.negatives, n_db - len(near))
        cands: np.ndarray = np.empty(0, dtype=np.int64)
        while len(cands) < want:
            draw = rng.integers(0, n_db, size=2 * want + 8)
            draw = draw[~np.isin(draw, near)]
            cands = np.concatenate([cands, draw[~np.isin(draw, cands)]])
            _, first = np.unique(cands, return_index=True)
            cands = cands[np.sort(first)]
        cands = cands[:want]
        if self.db_desc is not None and self.q_desc is not None:
            sims = self.db_desc[cands] @ self.q_desc[qi]
            cands = cands[np.argsort(-sims, kind="stable")]
        return cands[: self.negatives]

    def tuple_ids(self, k: int) -> tuple[int, int, np.ndarray, np.random.Generator]:
        """(query, positive, negatives) record indices of item ``k`` this epoch, and its generator."""
        rng = sample_rng(self.seed, self.epoch, k)
        qi = self.index[k]
        pos = self.places.positives()[qi]
        if self.db_desc is not None and self.q_desc is not None:
            p = int(pos[int(np.argmax(self.db_desc[pos] @ self.q_desc[qi]))])
        else:
            p = int(pos[int(rng.integers(len(pos)))])
        return qi, p, self._negatives(qi, rng), rng

    def __getitem__(self, k: int) -> dict[str, torch.Tensor | int]:
        qi, p, negs, rng = self.tuple_ids(k)
        records = [self.places.queries[qi], self.places.database[p], *(self.places.database[n] for n in negs)]
        hq = [self.cache.get(r) for r in records]
        lq = [self.degrader(im, rng) if (j == 0 or self.targets == "all") else im for j, im in enumerate(hq)]
        return {
            "hq": to_tensor_batch(hq, self.preprocess),
            "lq": to_tensor_batch(lq, self.preprocess),
            "ids": self.image_ids(qi, [p, *negs]),
            "index": k,
        }


def degrade_queries(places: PlaceDataset, degrader: Degrader, *, seed: int = 0) -> list[np.ndarray]:
    """Deterministically degraded query images (validation): query i uses generator (seed, 2**31 - 1, i)."""
    return [degrader(q.load(), sample_rng(seed, 2**31 - 1, i)) for i, q in enumerate(places.queries)]
