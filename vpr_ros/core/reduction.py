"""PCA reduction of global descriptors for large maps.

Fit on the map's descriptors, apply the same projection to the map and to every query, and
store the reduced vectors: memory and search time shrink by ``D / k``. Optional whitening
divides each component by its standard deviation (PCA-whitening, as NetVLAD's
``4096 -> 512``); outputs are L2-normalised again by default, so inner products stay cosines.

File format: a numpy ``.npz`` of plain arrays, read with ``allow_pickle=False`` (no code in the
file can run): ``format`` (``"vpr_ros.pca"``), ``version``, ``mean`` (D,), ``components`` (k, D),
``variances`` (k,), ``total_variance``, ``whiten``, ``eps``, ``normalize``, ``meta`` (JSON text).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vpr_ros.core.errors import VprError
from vpr_ros.core.fileio import atomic_path

__all__ = ["FORMAT", "PCA", "ReductionError"]

FORMAT = "vpr_ros.pca"
VERSION = 1
_CHUNK = 65536


class ReductionError(VprError, ValueError):
    """A bad reduction setting, input of the wrong dimension, or an unreadable reduction file."""


def _as_matrix(x: Any, what: str) -> np.ndarray:
    try:
        a = np.asarray(x)
    except (TypeError, ValueError) as exc:
        raise ReductionError(f"{what}: not an array ({exc})") from None
    if a.ndim != 2 or not np.issubdtype(a.dtype, np.floating):
        raise ReductionError(f"{what}: expected a 2-D float array, got shape {a.shape} dtype {a.dtype}")
    return a


@dataclass(frozen=True, eq=False)
class PCA:
    """A fitted projection ``D -> k``: ``mean`` (D,), ``components`` (k, D, orthonormal rows, by
    decreasing variance), ``variances`` (k,) along them, ``total_variance`` of the fitted data."""

    mean: np.ndarray
    components: np.ndarray
    variances: np.ndarray
    total_variance: float
    whiten: bool = False
    eps: float = 1e-6
    normalize: bool = True
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def input_dim(self) -> int:
        return int(self.components.shape[1])

    @property
    def output_dim(self) -> int:
        return int(self.components.shape[0])

    @property
    def explained_variance_ratio(self) -> float:
        """Share of the fitted data's variance the kept components hold (0..1)."""
        return float(self.variances.sum() / self.total_variance) if self.total_variance > 0 else 1.0

    @classmethod
    def fit(cls, x: np.ndarray, dim: int, *, whiten: bool = False, eps: float = 1e-6, normalize: bool = True,
            max_samples: int | None = None, seed: int = 0, meta: dict[str, Any] | None = None) -> PCA:
        """Fit on ``x`` (N, D) map descriptors; keep ``dim`` components.

        ``whiten`` scales component i by ``1 / sqrt(variance_i + eps)``; ``normalize`` L2-normalises
        outputs; ``max_samples`` fits on a random subset (seeded) of a very large map. The
        covariance is accumulated in float64 chunks, so memory stays O(D^2 + chunk * D).
        """
        x = _as_matrix(x, "PCA.fit")
        n, d = x.shape
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or not 1 <= dim <= d:
            raise ReductionError(f"PCA output dimension must be an integer in 1..{d}, got {dim!r}")
        if eps < 0:
            raise ReductionError(f"PCA eps must be >= 0, got {eps}")
        if max_samples is not None and n > max_samples:
            rows = np.sort(np.random.default_rng(seed).choice(n, int(max_samples), replace=False))
            x, n = x[rows], int(max_samples)
        if n < dim + 1:
            raise ReductionError(f"PCA to {dim} dims needs at least {dim + 1} descriptors, got {n}")
        if not np.isfinite(x).all():
            raise ReductionError("PCA.fit: descriptors contain NaN or infinite values")
        mean = np.zeros(d, np.float64)
        for s in range(0, n, _CHUNK):
            mean += x[s : s + _CHUNK].sum(axis=0, dtype=np.float64)
        mean /= n
        cov = np.zeros((d, d), np.float64)
        for s in range(0, n, _CHUNK):
            c = x[s : s + _CHUNK].astype(np.float64) - mean
            cov += c.T @ c
        cov /= n - 1
        evals, evecs = np.linalg.eigh(cov)
        order = np.argsort(evals)[::-1][:dim]
        comps = evecs[:, order].T
        signs = np.sign(comps[np.arange(dim), np.abs(comps).argmax(axis=1)])  # deterministic sign
        comps *= np.where(signs == 0, 1.0, signs)[:, None]
        evals = np.clip(evals, 0.0, None)
        return cls(mean=mean.astype(np.float32), components=np.ascontiguousarray(comps, np.float32),
                   variances=evals[order], total_variance=float(evals.sum()),
                   whiten=bool(whiten), eps=float(eps), normalize=bool(normalize),
                   meta={"fitted_on": n, **(meta or {})})

    def _projection(self) -> np.ndarray:
        p = self.components
        if self.whiten:
            p = p / np.sqrt(self.variances + self.eps).astype(np.float32)[:, None]
        return np.ascontiguousarray(p.T, np.float32)  # (D, k)

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Project (N, D) or (D,) descriptors to float32 (N, k) / (k,)."""
        a = np.asarray(x)
        single = a.ndim == 1
        a = _as_matrix(a[None] if single else a, "PCA.transform")
        if a.shape[1] != self.input_dim:
            raise ReductionError(f"PCA.transform: descriptors have {a.shape[1]} dims, the PCA was fitted "
                                 f"on {self.input_dim}")
        proj = self._projection()
        out = np.empty((len(a), self.output_dim), np.float32)
        for s in range(0, len(a), _CHUNK):
            out[s : s + _CHUNK] = (a[s : s + _CHUNK].astype(np.float32) - self.mean) @ proj
        if self.normalize:
            norms = np.linalg.norm(out, axis=1, keepdims=True)
            np.divide(out, norms, out=out, where=norms > 0)
        return out[0] if single else out

    __call__ = transform

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically as a no-pickle ``.npz`` and return the path."""
        path = Path(path)
        arrays = {
            "format": np.array(FORMAT), "version": np.array(VERSION, np.int64),
            "mean": self.mean, "components": self.components, "variances": self.variances,
            "total_variance": np.array(self.total_variance, np.float64), "whiten": np.array(self.whiten),
            "eps": np.array(self.eps, np.float64), "normalize": np.array(self.normalize),
            "meta": np.array(json.dumps(self.meta, sort_keys=True, default=str)),
        }
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> PCA:
        """Read a file written by :meth:`save`; :class:`ReductionError` on anything else."""
        path = Path(path)
        if not path.is_file():
            raise ReductionError(f"{path}: PCA file not found")
        try:
            with np.load(path, allow_pickle=False) as z:
                raw = {k: z[k] for k in z.files}
        except Exception as exc:  # not a zip, truncated, object arrays (pickle refused)
            raise ReductionError(f"{path}: not a readable PCA file ({type(exc).__name__}: {exc})") from None
        if raw.get("format") is None or str(raw["format"]) != FORMAT:
            raise ReductionError(f"{path}: not a vpr_ros PCA file (missing format tag {FORMAT!r})")
        if int(raw.get("version", -1)) > VERSION:
            raise ReductionError(f"{path}: PCA file version {int(raw['version'])} is newer than supported "
                                 f"({VERSION})")
        try:
            mean, comps, var = raw["mean"], raw["components"], raw["variances"]
            pca = cls(mean=mean.astype(np.float32), components=comps.astype(np.float32),
                      variances=var.astype(np.float64), total_variance=float(raw["total_variance"]),
                      whiten=bool(raw["whiten"]), eps=float(raw["eps"]), normalize=bool(raw["normalize"]),
                      meta=json.loads(str(raw["meta"])))
        except (KeyError, ValueError, TypeError) as exc:
            raise ReductionError(f"{path}: malformed PCA file ({exc})") from None
        k, d = pca.components.shape if pca.components.ndim == 2 else (0, 0)
        if not k or pca.mean.shape != (d,) or pca.variances.shape != (k,):
            raise ReductionError(f"{path}: inconsistent PCA shapes mean {pca.mean.shape}, components "
                                 f"{pca.components.shape}, variances {pca.variances.shape}")
        if not (np.isfinite(pca.components).all() and np.isfinite(pca.mean).all()):
            raise ReductionError(f"{path}: PCA file holds NaN or infinite values")
        return pca
