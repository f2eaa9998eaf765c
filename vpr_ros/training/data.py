"""Training data: place sets with positives/negatives, a split by place, tuples with degraded student input.

A :class:`PlaceSet` is queries + database records (core :class:`~vpr_ros.data.places.ImageRecord`)
and a :class:`Relation` that says which database images show the same place as a query (positives),
which are too close to serve as negatives (near), and which must be ignored altogether (the query's own
traverse a few seconds around it, for single-traverse bags). Sources:

* :func:`nordland_places`: frame-aligned seasons, positives within +-``pos_frames`` (the "by frame"
  ground truth), negatives beyond +-``neg_frames``;
* :func:`folder_places`: ``database/`` + ``queries/`` folders with ``@utm_e@utm_n@`` names or a CSV;
* :func:`bag_places`: recorded rosbag2 bags (images + Odometry/NavSatFix) via :mod:`vpr_ros.data.bags`;
  positives within ``pos_radius_m``, negatives beyond ``neg_radius_m``, and frames of the same bag less
  than ``min_time_gap_s`` apart never count as revisits.

:func:`split_places` splits by place (frame blocks / spatial grid cells, with a gap) so validation
places are never seen in training. :class:`TupleDataset` yields (query, positive, negatives) tuples as
high-quality tensors for the teacher and degraded tensors for the student; the degradation and the
sampling of each item are seeded by (seed, epoch, index) only, so they are reproducible whatever the
worker count, process count or resume point.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from vpr_ros.core.errors import DatasetError
from vpr_ros.core.preprocess import to_tensor_batch
from vpr_ros.core.models.registry import Preprocess
from vpr_ros.core.transmission import TransmissionConfig, degrade_image
from vpr_ros.data.bags import read_image_bag
from vpr_ros.data.places import GroundTruth, ImageRecord, load_image_folder, load_nordland
from vpr_ros.training.config import DataConfig, SplitConfig

log = logging.getLogger(__name__)


@dataclass
class MemoryImageRecord(ImageRecord):
    """An image record whose pixels are held in memory (frames read from a bag)."""

    image: np.ndarray | None = None

    def load(self) -> np.ndarray:
        if self.image is None:
            return super().load()
        return self.image


@dataclass(frozen=True)
class Relation:
    """Which database records relate to a query: by ``frame`` index or by planar ``distance``.

    positives: within ``pos`` (frames or metres); near (never negatives): within ``neg``; excluded
    (neither positive nor negative, and left out of retrieval): the same record, and records of the
    same ``sequence`` whose stamps are less than ``min_time_gap_s`` apart.
    """

    kind: str  # "frame" | "distance"
    pos: float
    neg: float
    min_time_gap_s: float = 0.0

    def describe(self) -> str:
        unit = "frames" if self.kind == "frame" else "m"
        text = f"positives within {self.pos:g} {unit}, negatives beyond {self.neg:g} {unit}"
        if self.min_time_gap_s > 0:
            text += f", same-traverse frames < {self.min_time_gap_s:g} s apart ignored"
        return text

    def relate(
        self, queries: Sequence[ImageRecord], database: Sequence[ImageRecord]
    ) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
        """(positives, near, excluded): per query, sorted database indices."""
        if self.kind == "frame":
            pos = GroundTruth("frame", tolerance=int(self.pos)).positives(database, queries)
            near = GroundTruth("frame", tolerance=int(self.neg)).positives(database, queries)
        else:
            pos = GroundTruth("distance", radius_m=float(self.pos)).positives(database, queries)
            near = GroundTruth("distance", radius_m=float(self.neg)).positives(database, queries)
        excl = _temporal_exclusions(queries, database, self.min_time_gap_s)
        pos = [
            np.setdiff1d(p, e, assume_unique=True) if len(e) else p for p, e in zip(pos, excl, strict=True)
        ]
        near = [np.union1d(n, e) if len(e) else n for n, e in zip(near, excl, strict=True)]
        return pos, near, excl


def _temporal_exclusions(
    queries: Sequence[ImageRecord], database: Sequence[ImageRecord], gap: float
) -> list[np.ndarray]:
    ident = {id(r): i for i, r in enumerate(database)}
    by_seq: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(database):
        if r.sequence is not None and r.stamp is not None:
            by_seq[r.sequence].append(i)
    index = {}
    for seq, members in by_seq.items():
        arr = np.asarray(members, dtype=np.int64)
        stamps = np.asarray([database[i].stamp for i in arr], dtype=np.float64)
        order = np.argsort(stamps, kind="stable")
        index[seq] = (stamps[order], arr[order])
    out = []
    for q in queries:
        ex: list[int] = []
        if id(q) in ident:
            ex.append(ident[id(q)])
        if gap > 0 and q.sequence in index and q.stamp is not None:
            stamps, members = index[q.sequence]
            lo = np.searchsorted(stamps, q.stamp - gap, side="right")
            hi = np.searchsorted(stamps, q.stamp + gap, side="left")
            ex.extend(members[lo:hi].tolist())
        out.append(np.unique(np.asarray(ex, dtype=np.int64)))
    return out


@dataclass
class PlaceSet:
    """Queries and database with their positives / near / excluded database indices per query."""

    name: str
    queries: list[ImageRecord]
    database: list[ImageRecord]
    relation: Relation
    positives: list[np.ndarray] = field(default_factory=list)
    near: list[np.ndarray] = field(default_factory=list)
    excluded: list[np.ndarray] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.positives:
            self.positives, self.near, self.excluded = self.relation.relate(self.queries, self.database)

    def subset(
        self,
        query_ids: Sequence[int] | None = None,
        db_ids: Sequence[int] | None = None,
        name: str | None = None,
    ) -> PlaceSet:
        """The places restricted to some queries / database records (relations recomputed)."""
        qs = self.queries if query_ids is None else [self.queries[i] for i in query_ids]
        db = self.database if db_ids is None else [self.database[i] for i in db_ids]
        return PlaceSet(name or self.name, qs, db, self.relation)

    def with_positive_queries(self, limit: int | None = None) -> PlaceSet:
        """Only queries that have a positive (and enough non-near database images for negatives); at
        most ``limit`` of them, evenly spaced."""
        keep = [i for i, p in enumerate(self.positives) if len(p) > 0]
        if limit is not None and len(keep) > limit:
            keep = [keep[int(j)] for j in np.linspace(0, len(keep) - 1, limit).round().astype(int)]
        return replace(
            self,
            queries=[self.queries[i] for i in keep],
            positives=[self.positives[i] for i in keep],
            near=[self.near[i] for i in keep],
            excluded=[self.excluded[i] for i in keep],
        )

    def summary(self) -> str:
        with_pos = sum(1 for p in self.positives if len(p))
        return (
            f"{self.name}: {len(self.queries)} queries ({with_pos} with a positive), "
            f"{len(self.database)} database images; {self.relation.describe()}"
        )


# --------------------------------------------------------------------------- sources


def nordland_places(
    root: str | Path,
    *,
    query_season: str = "winter",
    database_season: str = "summer",
    pos_frames: int = 2,
    neg_frames: int = 10,
    limit: int | None = None,
) -> PlaceSet:
    """Nordland (core loader, dark and frozen frames dropped; the first ``limit`` places when given):
    frame-aligned positives."""
    ds = load_nordland(
        root, database_season=database_season, query_season=query_season, tolerance=pos_frames, limit=limit
    )
    return PlaceSet(ds.name, ds.queries, ds.database, Relation("frame", pos_frames, neg_frames))


def folder_places(
    root: str | Path,
    *,
    positions_csv: str | Path | None = None,
    pos_radius_m: float = 10.0,
    neg_radius_m: float = 25.0,
) -> PlaceSet:
    """An image folder (``database/``, ``queries/``; UTM names or a positions CSV): distance positives."""
    ds = load_image_folder(root, positions_csv=positions_csv, radius_m=pos_radius_m)
    return PlaceSet(ds.name, ds.queries, ds.database, Relation("distance", pos_radius_m, neg_radius_m))


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
) -> PlaceSet:
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
    return PlaceSet(
        name,
        records,
        records,
        Relation("distance", pos_radius_m, neg_radius_m, min_time_gap_s=min_time_gap_s),
    )


def build_places(cfg: DataConfig) -> PlaceSet:
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


# --------------------------------------------------------------------------- split by place


def _is_val_block(ids: np.ndarray, split: SplitConfig) -> np.ndarray:
    return (ids % split.val_every) == split.val_offset


def _val_flags(records: Sequence[ImageRecord], kind: str, split: SplitConfig) -> np.ndarray:
    if kind == "frame":
        frames = np.asarray([r.frame_index for r in records], dtype=np.int64)
        return _is_val_block(np.floor_divide(frames, max(1, int(split.block))), split)
    xy = np.asarray([r.position for r in records], dtype=np.float64).reshape(-1, 2)
    cells = np.floor(xy / split.block).astype(np.int64)
    ids = np.abs(cells[:, 0] * 73856093 ^ cells[:, 1] * 19349663)  # spatial hash of the grid cell
    return _is_val_block(ids, split)


def _near_any(points: np.ndarray, others: np.ndarray, gap: float) -> np.ndarray:
    """Per point, whether any of ``others`` lies within ``gap`` (1-D frames or 2-D positions)."""
    out = np.zeros(len(points), dtype=bool)
    if len(others) == 0 or len(points) == 0:
        return out
    if points.ndim == 1:
        srt = np.sort(others)
        j = (
            np.clip(np.searchsorted(srt, points), 1, len(srt) - 1)
            if len(srt) > 1
            else np.zeros(len(points), int)
        )
        d = np.minimum(np.abs(points - srt[j]), np.abs(points - srt[np.maximum(j - 1, 0)]))
        return d <= gap
    for s in range(0, len(points), 2048):
        d2 = ((points[s : s + 2048, None, :] - others[None, :, :]) ** 2).sum(-1)
        out[s : s + 2048] = (d2 <= gap * gap).any(axis=1)
    return out


def split_places(places: PlaceSet, split: SplitConfig) -> tuple[PlaceSet, PlaceSet]:
    """(train, val) by place: frame blocks (frame relation) or spatial grid cells (distance relation).

    Every record, query or database, goes to the side of its block; training records within
    ``split.gap`` of a validation record are dropped. Raises DatasetError when a side is empty.
    """
    kind = places.relation.kind
    coord = (
        (lambda recs: np.asarray([r.frame_index for r in recs], dtype=np.float64))
        if kind == "frame"
        else (lambda recs: np.asarray([r.position for r in recs], dtype=np.float64).reshape(-1, 2))
    )
    q_val = _val_flags(places.queries, kind, split)
    d_val = _val_flags(places.database, kind, split)
    val_coords = np.concatenate([coord(places.queries)[q_val], coord(places.database)[d_val]])
    q_train = ~q_val & ~_near_any(coord(places.queries), val_coords, split.gap)
    d_train = ~d_val & ~_near_any(coord(places.database), val_coords, split.gap)
    train = places.subset(np.nonzero(q_train)[0], np.nonzero(d_train)[0], name=f"{places.name}/train")
    val = places.subset(np.nonzero(q_val)[0], np.nonzero(d_val)[0], name=f"{places.name}/val")
    unit = "frames" if kind == "frame" else "m"
    for side in (train, val):
        if not side.queries or not side.database or not any(len(p) for p in side.positives):
            raise DatasetError(
                f"{side.name}: the split (blocks of {split.block:g} {unit}, every {split.val_every}th from "
                f"{split.val_offset}, gap {split.gap:g} {unit}) leaves {len(side.queries)} queries and "
                f"{len(side.database)} database images with no usable positive pair; change data.split"
            )
    return train, val


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
        return image if cfg.mode == "none" else degrade_image(image, cfg).image


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
        places: PlaceSet,
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
        self.index = [
            i
            for i, p in enumerate(places.positives)
            if len(p) and n_db - len(places.near[i]) >= self.negatives
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
        near = self.places.near[qi]
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
        pos = self.places.positives[qi]
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


def degrade_queries(places: PlaceSet, degrader: Degrader, *, seed: int = 0) -> list[np.ndarray]:
    """Deterministically degraded query images (validation): query i uses generator (seed, 2**31 - 1, i)."""
    return [degrader(q.load(), sample_rng(seed, 2**31 - 1, i)) for i, q in enumerate(places.queries)]
