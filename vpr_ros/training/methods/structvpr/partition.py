"""Group partition (StructVPR Sec. 3.4): which training pairs carry structural knowledge worth distilling.

For each training pair (q, p) -- a query and one of its positives -- ``x`` is "the ranking of the
positive p in the recall list of the query q" by the Stage-I seg-branch and ``y`` the same by the
Stage-I rgb-branch (1 = first). With the threshold N_t (10 in the paper):

* D1: ``x <= N_t < y`` -- the seg-branch finds p, the rgb-branch does not: high-quality knowledge the
  student lacks;
* D2: ``x <= y <= N_t`` -- both find p, the seg-branch at least as well;
* D3: ``y < x <= N_t`` -- both find p, the rgb-branch better;
* D4: ``x > N_t`` -- the seg-branch fails: its knowledge is noise for this pair (weight 0).

The one-branch partitions of the ablation (Sec. 4.4): GP-S (only the teacher, the seg-branch) keeps
S1 = ``x <= N_t`` (S2 = D4 is dropped); GP-R (only the student, the rgb-branch) keeps R1 = ``y <= N_t``
(R2 = ``y > N_t``, which Table 5 shows harms distillation, is dropped).

Ranks (``rank``): ``list`` (the paper's) is p's position in q's recall list over all database images,
other positives of q included; ``wrong-only`` counts only the non-positives that score above p (another
correct place ahead of p is then no mistake). Either way the images excluded for q (the query itself and
its own few neighbouring frames, which a separate query set as in the paper's MSLS never contains) are
never counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

GROUPS = ("D1", "D2", "D3", "D4")
MODES = ("gp-d", "gp-s", "gp-r", "all")
RANKS = ("list", "wrong-only")


@dataclass
class Pairs:
    """All training pairs with their ranks: ``q`` query index, ``p`` database index, ``x`` / ``y`` ranks."""

    q: np.ndarray
    p: np.ndarray
    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.q)


def positive_ranks(
    q_desc: np.ndarray,
    db_desc: np.ndarray,
    positives: Sequence[np.ndarray],
    excluded: Sequence[np.ndarray] | None = None,
    *,
    rank: str = "list",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(q, p, rank) of every (query, positive) pair under cosine similarity of the given descriptors;
    ``rank`` list (p's position among all database images, the paper's) or wrong-only."""
    if rank not in RANKS:
        raise ValueError(f"unknown rank {rank!r}; expected one of {RANKS}")
    qs, ps, ranks = [], [], []
    for i, pos in enumerate(positives):
        if len(pos) == 0:
            continue
        sims = db_desc @ q_desc[i]
        competitor = np.ones(len(db_desc), dtype=bool)
        if excluded is not None and len(excluded[i]):
            competitor[excluded[i]] = False
        if rank == "wrong-only":
            competitor[pos] = False
        others = np.sort(sims[competitor])
        above = len(others) - np.searchsorted(others, sims[pos], side="right")  # strictly better, ties to p
        qs.append(np.full(len(pos), i))
        ps.append(np.asarray(pos))
        ranks.append(1 + above)
    if not qs:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty, empty
    return (
        np.concatenate(qs).astype(np.int64),
        np.concatenate(ps).astype(np.int64),
        np.concatenate(ranks).astype(np.int64),
    )


def rank_pairs(
    seg: tuple[np.ndarray, np.ndarray],
    rgb: tuple[np.ndarray, np.ndarray],
    positives: Sequence[np.ndarray],
    excluded: Sequence[np.ndarray] | None = None,
    *,
    rank: str = "list",
) -> Pairs:
    """Ranks x (seg-branch) and y (rgb-branch) of every training pair; ``seg`` / ``rgb`` are
    (query descriptors, database descriptors) of the two branches."""
    q, p, x = positive_ranks(*seg, positives, excluded, rank=rank)
    q2, p2, y = positive_ranks(*rgb, positives, excluded, rank=rank)
    assert np.array_equal(q, q2) and np.array_equal(p, p2)
    return Pairs(q, p, x, y)


def group_of(x: np.ndarray | int, y: np.ndarray | int, n_t: int = 10) -> np.ndarray:
    """GP-D group index 0..3 (D1..D4) of ranks (x, y)."""
    x, y = np.asarray(x), np.asarray(y)
    return np.select([x > n_t, y > n_t, x <= y], [3, 0, 1], default=2)


def keep_mask(x: np.ndarray | int, y: np.ndarray | int, mode: str, n_t: int = 10) -> np.ndarray:
    """Which pairs a partition keeps for distillation: GP-D drops D4, GP-S keeps S1 ``x <= N_t``,
    GP-R keeps R1 ``y <= N_t``, ``all`` keeps every pair (non-selective distillation)."""
    x, y = np.asarray(x), np.asarray(y)
    if mode == "gp-d":
        return group_of(x, y, n_t) != 3
    if mode == "gp-s":
        return x <= n_t
    if mode == "gp-r":
        return y <= n_t
    if mode == "all":
        return np.ones(np.broadcast(x, y).shape, dtype=bool)
    raise ValueError(f"unknown partition {mode!r}; expected one of {MODES}")


def group_shares(pairs: Pairs, n_t: int = 10) -> dict[str, float]:
    """Share of the training pairs in each of D1..D4 (fractions summing to 1)."""
    g = group_of(pairs.x, pairs.y, n_t)
    counts = np.bincount(g, minlength=4)
    return {name: float(c / max(1, len(g))) for name, c in zip(GROUPS, counts, strict=True)}
