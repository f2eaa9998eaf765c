"""Descriptor extraction: RGB uint8 images -> L2-normalised float32 descriptors."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from vpr_ros.core.backends import InferenceBackend, make_backend
from vpr_ros.core.errors import ImageError
from vpr_ros.core.images import as_rgb8, load_image
from vpr_ros.core.models.registry import VprModel

log = logging.getLogger(__name__)


@dataclass
class Extraction:
    """Descriptors of the images that could be used, and why the others could not."""

    descriptors: np.ndarray  # (N_ok, D) float32
    indices: np.ndarray  # (N_ok,) positions in the input sequence
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (input position, reason)


class DescriptorExtractor:
    """Runs a :class:`VprModel` on batches of images through an inference backend, on GPU when present.

    ``backend``: ``"torch"`` (default, eager channels_last), ``"onnx"`` (ONNX Runtime), or a ready
    :class:`~vpr_ros.core.backends.InferenceBackend`; ``precision`` ``"fp32"`` or ``"fp16"`` (CUDA
    only); ``backend_options`` go to :func:`~vpr_ros.core.backends.make_backend` (e.g. ``cache_dir``,
    ``threads`` for onnx, ``channels_last``, ``compile`` for torch).
    """

    def __init__(
        self,
        model: VprModel,
        *,
        device: str | torch.device = "auto",
        batch_size: int = 32,
        backend: str | InferenceBackend = "torch",
        precision: str = "fp32",
        **backend_options: object,
    ) -> None:
        self.batch_size = max(1, int(batch_size))
        if isinstance(backend, InferenceBackend):
            self.backend = backend
        else:
            self.backend = make_backend(model, backend, device=device, precision=precision,
                                        max_batch=self.batch_size, **backend_options)
        self.device = self.backend.device
        self.model = self.backend.model
        self.preprocess = self.backend.preprocess
        self.dim = int(self.backend.dim)

    def __call__(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Descriptors (N, D) for validated RGB uint8 images; raises ImageError on a bad one."""
        images = [as_rgb8(im, name=f"image {i}") for i, im in enumerate(images)]
        out = np.empty((len(images), self.dim), dtype=np.float32)
        if self.preprocess.input_size is not None:
            groups = {None: list(range(len(images)))}
        else:  # native sizes: batch images of equal size together
            groups: dict = {}
            for i, im in enumerate(images):
                groups.setdefault(im.shape[:2], []).append(i)
        for idx in groups.values():
            for s in range(0, len(idx), self.batch_size):
                chunk = idx[s : s + self.batch_size]
                out[chunk] = self.backend([images[i] for i in chunk])
        return out

    def extract_stream(
        self,
        items: Iterable[object],
        *,
        load: Callable[[object], np.ndarray] = load_image,
        transform: Callable[[np.ndarray], np.ndarray] | None = None,
        total: int | None = None,
        desc: str = "extract",
        progress: bool = True,
    ) -> Extraction:
        """Load (and optionally degrade) items one by one, batching the model calls.

        Items that fail to load or validate are skipped, counted and logged with the reason.
        """
        descs: list[np.ndarray] = []
        kept: list[int] = []
        skipped: list[tuple[int, str]] = []
        batch: list[np.ndarray] = []
        batch_idx: list[int] = []

        def flush() -> None:
            if batch:
                descs.append(self(batch))
                kept.extend(batch_idx)
                batch.clear()
                batch_idx.clear()

        for i, item in enumerate(tqdm(items, total=total, desc=desc, disable=not progress, unit="img")):
            try:
                image = as_rgb8(load(item), name=str(item))
                if transform is not None:
                    image = transform(image)
            except ImageError as exc:
                skipped.append((i, str(exc)))
                log.warning("skipped %s", exc)
                continue
            batch.append(image)
            batch_idx.append(i)
            if len(batch) >= self.batch_size:
                flush()
        flush()
        d = np.concatenate(descs) if descs else np.empty((0, self.dim), np.float32)
        return Extraction(d, np.asarray(kept, dtype=np.int64), skipped)

    def extract_files(self, paths: Sequence[str | Path], **kw) -> Extraction:
        return self.extract_stream(paths, total=len(paths), **kw)
