"""Segmentation sources: ESPNetv2 (strict load of the shared Cityscapes checkpoints, a sanity check on a
real KITTI frame, clear errors), label folders, the label cache and the optional torchvision plug."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vpr_ros.core.errors import DatasetError, ImageError, ModelError
from vpr_ros.core.images import load_image, save_image
from vpr_ros.training.methods.structvpr.segmentation import (
    CITYSCAPES_CLASSES,
    ESPNetv2Seg,
    ESPNetv2Segmenter,
    LabelCache,
    LabelFolderSegmenter,
    Segmenter,
    colorize,
    load_espnetv2,
    read_label_map,
    segment_files,
    write_label_map,
)

WEIGHTS = "weights/espnetv2_s_{s}_city_1024x512.pth"


def _keys_listing(path) -> dict[str, tuple[int, ...]]:
    out = {}
    for line in path.read_text().splitlines():
        key, shape = line.split("\t")
        out[key] = tuple(int(v) for v in shape.strip("()").split(",") if v.strip())
    return out


@pytest.mark.parametrize("s", ["2.0", "1.0"])
def test_espnetv2_matches_the_key_listing_and_loads_strictly(shared_dir, s):
    listing = _keys_listing(shared_dir / f"weights/espnetv2_s_{s}_city_1024x512.keys.txt")
    built = {k: tuple(v.shape) for k, v in ESPNetv2Seg(float(s)).state_dict().items()}
    assert built == listing, "architecture differs from the checkpoint's key/shape listing"
    net = load_espnetv2(shared_dir / WEIGHTS.format(s=s))
    widths = (32, 128, 256, 512) if s == "2.0" else (32, 64, 128, 256)
    assert not net.training and net.base_net.channels == widths
    with torch.inference_mode():
        out = net(torch.zeros(1, 3, 64, 128))
    assert out.shape == (1, 20, 64, 128)


def test_espnetv2_checkpoint_errors(shared_dir, tmp_path):
    good = torch.load(shared_dir / WEIGHTS.format(s="1.0"), map_location="cpu", weights_only=True)
    with pytest.raises(ModelError, match="s=1, but s=2 was asked"):
        load_espnetv2(shared_dir / WEIGHTS.format(s="1.0"), s=2.0)
    broken = dict(good)
    broken.pop("bu_dec_l2.stages.3.weight")
    broken["bu_dec_l1.br.br.1.weight"] = torch.zeros(7)
    broken["extra.weight"] = torch.zeros(1)
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(ModelError) as err:
        load_espnetv2(tmp_path / "broken.pth")
    text = str(err.value)
    assert "1 missing keys" in text and "1 unexpected keys" in text and "1 shape mismatches" in text
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    with pytest.raises(ModelError, match="not an ESPNetv2 segmentation checkpoint"):
        load_espnetv2(tmp_path / "other.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="not a readable torch checkpoint"):
        load_espnetv2(tmp_path / "junk.pth")
    with pytest.raises(ModelError, match="not found"):
        load_espnetv2(tmp_path / "missing.pth")


def test_espnetv2_sees_sky_on_top_and_road_below_in_a_real_kitti_frame(shared_dir, kitti_dir):
    torch.set_num_threads(1)
    seg = ESPNetv2Segmenter(shared_dir / WEIGHTS.format(s="2.0"), width=512)
    image = load_image(kitti_dir / "05" / "image_0" / "000060.jpg")  # a street with open sky
    labels = seg.segment(image)
    assert labels.shape == image.shape[:2] and labels.dtype == np.uint8
    assert seg.classes == CITYSCAPES_CLASSES and seg.id == "espnetv2_s2_city_w512"
    h = labels.shape[0]
    top = np.bincount(labels[: h // 5].ravel(), minlength=20) / labels[: h // 5].size
    bottom = np.bincount(labels[-h // 5 :].ravel(), minlength=20) / labels[-h // 5 :].size
    sky, road = CITYSCAPES_CLASSES.index("sky"), CITYSCAPES_CLASSES.index("road")
    assert top.argmax() == sky and top[sky] > 0.35, f"top fifth: {top.round(2)}"
    assert bottom.argmax() == road and bottom[road] > 0.8, f"bottom fifth: {bottom.round(2)}"
    assert colorize(labels).shape == (*labels.shape, 3)


class CountingSegmenter(Segmenter):
    id = "count/v1"
    classes = ("a", "b", "c")

    def __init__(self) -> None:
        self.calls = 0

    def segment(self, image: np.ndarray) -> np.ndarray:
        self.calls += 1
        return (image[:, :, 0] > 127).astype(np.uint8)


def test_label_cache_computes_once_per_image_and_segmenter(tmp_path):
    paths = []
    for i in range(3):
        img = np.full((12, 20, 3), 200 if i else 10, np.uint8)
        save_image(tmp_path / f"im{i}.png", img)
        paths.append(tmp_path / f"im{i}.png")
    cache, seg = LabelCache(tmp_path / "cache"), CountingSegmenter()
    files = segment_files(paths, seg, cache, progress=False)
    assert seg.calls == 3 and all(f.is_file() for f in files)
    assert (read_label_map(files[0]) == 0).all() and (read_label_map(files[1]) == 1).all()
    segment_files(paths, seg, cache, progress=False)
    assert seg.calls == 3, "cached maps were recomputed"
    assert cache.get(paths[2], seg).shape == (12, 20) and seg.calls == 3
    other = CountingSegmenter()
    other.id = "count/v2"
    assert cache.path(paths[0], other.id) != files[0]  # keyed by segmenter id
    save_image(paths[0], np.full((12, 20, 3), 250, np.uint8))  # a changed image gets a new key
    assert cache.path(paths[0], seg.id) != files[0]


def test_label_folder_source(tmp_path):
    img_root = tmp_path / "images"
    (img_root / "seq").mkdir(parents=True)
    save_image(img_root / "seq" / "f1.jpg", np.zeros((8, 12, 3), np.uint8))
    write_label_map(tmp_path / "labels" / "seq" / "f1.png", np.full((4, 6), 10, np.uint8))
    src = LabelFolderSegmenter(tmp_path / "labels", image_root=img_root)
    m = src.segment_file(img_root / "seq" / "f1.jpg")
    assert m.shape == (8, 12) and (m == 10).all()  # resized to the image
    write_label_map(tmp_path / "flat" / "f1.png", np.full((8, 12), 2, np.uint8))
    assert (LabelFolderSegmenter(tmp_path / "flat").segment_file(img_root / "seq" / "f1.jpg") == 2).all()
    with pytest.raises(ImageError, match="no such label map"):
        LabelFolderSegmenter(tmp_path / "flat").segment_file(tmp_path / "nope.jpg")
    with pytest.raises(DatasetError):
        LabelFolderSegmenter(tmp_path / "missing")
    with pytest.raises(ImageError):
        write_label_map(tmp_path / "x.png", np.zeros((2, 2, 3), np.uint8))


def test_torchvision_plug_without_downloads():
    from vpr_ros.training.methods.structvpr.segmentation import TorchvisionSegmenter

    seg = TorchvisionSegmenter("lraspp_mobilenet_v3_large", weights=None, num_classes=4, short_side=64)
    out = seg.segment(np.zeros((40, 72, 3), np.uint8))
    assert out.shape == (40, 72) and out.max() < 4 and len(seg.classes) == 4
    with pytest.raises(ModelError):
        TorchvisionSegmenter("no_such_model", weights=None)
