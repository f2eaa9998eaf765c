"""Descriptor extraction on real images: batching, native sizes, counted skips."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vpr_ros.core.errors import ImageError
from vpr_ros.core.extract import DescriptorExtractor
from vpr_ros.core.images import load_image
from vpr_ros.core.models import Preprocess, create_model
from vpr_ros.core.preprocess import resize_rgb, to_tensor_batch


@pytest.fixture(scope="module")
def extractor():
    torch.manual_seed(0)
    model = create_model("structvpr_mobilenetv2", preprocess=Preprocess(input_size=(64, 128)))
    return DescriptorExtractor(model, device="cpu", batch_size=4)


def test_batching_does_not_change_descriptors(extractor, nordland_dir):
    images = [load_image(p) for p in sorted((nordland_dir / "summer").glob("*.png"))[100:110]]
    all_at_once = extractor(images)
    one_by_one = np.concatenate([extractor([im]) for im in images])
    assert all_at_once.shape == (10, 448) and all_at_once.dtype == np.float32
    assert np.allclose(all_at_once, one_by_one, atol=1e-5)
    assert np.allclose(np.linalg.norm(all_at_once, axis=1), 1.0, atol=1e-5)


def test_native_size_groups_images_of_equal_size():
    model = create_model("structvpr_mobilenetv2", preprocess=Preprocess(input_size=None))
    ex = DescriptorExtractor(model, device="cpu", batch_size=8)
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 255, (64, 96, 3), np.uint8), rng.integers(0, 255, (96, 64, 3), np.uint8)
    out = ex([a, b, a])
    assert np.allclose(out[0], out[2], atol=1e-5) and not np.allclose(out[0], out[1])


def test_stream_skips_bad_images_with_reasons(extractor, nordland_dir, tmp_path):
    good = sorted((nordland_dir / "winter").glob("*.png"))[200:203]
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    items = [good[0], empty, good[1], corrupt, tmp_path / "missing.png", good[2]]
    ext = extractor.extract_files(items, progress=False)
    assert ext.indices.tolist() == [0, 2, 5]
    assert ext.descriptors.shape == (3, 448)
    reasons = dict(ext.skipped)
    assert set(reasons) == {1, 3, 4}
    assert "empty file" in reasons[1] and "not a decodable image" in reasons[3] and "no such" in reasons[4]


def test_direct_call_rejects_bad_arrays(extractor):
    with pytest.raises(ImageError, match="zero-size"):
        extractor([np.zeros((0, 10, 3), np.uint8)])
    with pytest.raises(ImageError, match="NaN"):
        extractor([np.full((10, 10, 3), np.nan, np.float32)])
    with pytest.raises(ImageError, match="channel count 2"):
        extractor([np.zeros((10, 10, 2), np.uint8)])


def test_preprocessing_normalises_with_model_statistics():
    pre = Preprocess(input_size=(2, 2), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    x = to_tensor_batch([np.full((4, 4, 3), 255, np.uint8)], pre)
    assert x.shape == (1, 3, 2, 2) and torch.allclose(x, torch.ones_like(x))
    assert resize_rgb(np.zeros((10, 20, 3), np.uint8), (5, 10)).shape == (5, 10, 3)
