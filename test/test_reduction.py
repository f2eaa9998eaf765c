"""PCA reduction: correct projection, whitening, deterministic and chunk-independent fit, no-pickle
save/load with clear errors, and neighbours preserved on real (Nordland) descriptors."""

from __future__ import annotations

import numpy as np
import pytest

from vpr_ros.core import reduction
from vpr_ros.core.errors import VprError
from vpr_ros.core.reduction import PCA, ReductionError


def clustered(n: int, d: int = 448, rank: int = 24, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((rank, d))
    scale = np.linspace(3, 0.5, rank)
    x = rng.standard_normal((n, rank)) * scale @ basis + 0.05 * rng.standard_normal((n, d))
    x = x.astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_fit_matches_svd_and_components_are_orthonormal():
    x = clustered(600, d=64, rank=8)
    pca = PCA.fit(x, 8, normalize=False)
    assert (pca.input_dim, pca.output_dim) == (64, 8)
    assert np.allclose(pca.components @ pca.components.T, np.eye(8), atol=1e-5)
    c = x.astype(np.float64) - x.mean(0)
    _, s, vt = np.linalg.svd(c, full_matrices=False)
    assert np.allclose(pca.variances, s[:8] ** 2 / (len(x) - 1), rtol=1e-6)
    assert np.allclose(np.abs(pca.components @ vt[:8].T), np.eye(8), atol=1e-4)  # same axes up to sign
    assert 0.9 < pca.explained_variance_ratio <= 1.0
    y = pca.transform(x)
    assert y.shape == (600, 8) and y.dtype == np.float32
    assert np.allclose(y, (x - pca.mean) @ pca.components.T, atol=1e-5)


def test_whitening_gives_unit_variance_and_normalize_gives_unit_norm():
    x = clustered(2000, d=96, rank=12)
    white = PCA.fit(x, 12, whiten=True, normalize=False, eps=0.0).transform(x)
    assert np.allclose(white.var(axis=0, ddof=1), 1.0, atol=1e-3)
    unit = PCA.fit(x, 12, whiten=True).transform(x)
    assert np.allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-5)
    assert PCA.fit(x, 12).transform(x[0]).shape == (12,)


def test_fit_is_deterministic_and_independent_of_chunking(monkeypatch):
    x = clustered(1000, d=48, rank=6, seed=3)
    a = PCA.fit(x, 6)
    monkeypatch.setattr(reduction, "_CHUNK", 97)
    b = PCA.fit(x, 6)
    assert np.allclose(a.components, b.components, atol=1e-5) and np.allclose(a.mean, b.mean, atol=1e-6)
    assert np.allclose(a.transform(x), b.transform(x), atol=1e-5)
    sub = PCA.fit(x, 6, max_samples=500, seed=1)
    assert sub.meta["fitted_on"] == 500


def test_save_load_round_trip_without_pickle(tmp_path):
    x = clustered(500, d=64, rank=8)
    pca = PCA.fit(x, 16, whiten=True, meta={"model": "structvpr_mobilenetv2"})
    path = pca.save(tmp_path / "map.pca.npz")
    back = PCA.load(path)
    assert back.whiten and back.normalize
    assert back.meta == {"fitted_on": 500, "model": "structvpr_mobilenetv2"}
    assert np.array_equal(back.transform(x), pca.transform(x))
    assert [p.name for p in tmp_path.iterdir()] == ["map.pca.npz"]  # no temporary files left


def test_bad_files_and_bad_inputs_raise_reduction_error(tmp_path):
    x = clustered(300, d=32, rank=4)
    pca = PCA.fit(x, 4)
    assert issubclass(ReductionError, VprError)
    with pytest.raises(ReductionError, match="not found"):
        PCA.load(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(ReductionError, match="not a readable PCA file"):
        PCA.load(tmp_path / "junk.npz")
    np.savez(tmp_path / "other.npz", mean=np.zeros(3))
    with pytest.raises(ReductionError, match="format tag"):
        PCA.load(tmp_path / "other.npz")
    np.savez(tmp_path / "pickled.npz", format=np.array([{"evil": 1}], dtype=object))
    with pytest.raises(ReductionError, match="not a readable PCA file"):
        PCA.load(tmp_path / "pickled.npz")
    with pytest.raises(ReductionError, match="fitted on 32"):
        pca.transform(np.zeros((2, 16), np.float32))
    with pytest.raises(ReductionError, match="1..32"):
        PCA.fit(x, 33)
    with pytest.raises(ReductionError, match="at least 11 descriptors"):
        PCA.fit(x[:5], 10)
    with pytest.raises(ReductionError, match="NaN"):
        PCA.fit(np.full((20, 32), np.nan, np.float32), 4)
    with pytest.raises(ReductionError, match="2-D float"):
        PCA.fit(np.zeros((20, 32), np.int64), 4)


def test_discarded_variance_is_the_reconstruction_error_on_real_descriptors(nordland_dir, torch_home):
    from vpr_ros.core.extract import DescriptorExtractor
    from vpr_ros.core.images import load_image
    from vpr_ros.core.models import Preprocess, create_model

    pre = Preprocess(input_size=(64, 128))
    model = create_model("structvpr_mobilenetv2", pretrained=True, preprocess=pre)
    ex = DescriptorExtractor(model, device="cpu", batch_size=64)
    paths = sorted((nordland_dir / "summer").glob("*.png"))[40:3540:12]
    db = ex([load_image(p) for p in paths])
    pca = PCA.fit(db, 128, normalize=False)
    y = pca.transform(db)
    recon = y @ pca.components + pca.mean
    err = ((db - recon) ** 2).sum(1).sum() / (len(db) - 1)
    assert np.isclose(err, pca.total_variance - pca.variances.sum(), rtol=1e-3)
    assert 0.5 < pca.explained_variance_ratio < 1.0
