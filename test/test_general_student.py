"""The general-student recipe (training.methods.general): link mix, pool, pre-encoded pairs, a short run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from vpr_ros.core.errors import ConfigError
from vpr_ros.core.images import save_image
from vpr_ros.core.localizer import build_extractor
from vpr_ros.core.models import create_model, load_model, save_checkpoint
from vpr_ros.core.models.card import read_card
from vpr_ros.training.config import SplitConfig
from vpr_ros.training.methods.general import (
    METHOD,
    LinkMixConfig,
    PairStore,
    _nordland_kept,
    export_general,
    pair_rng,
    source_records,
    train_general,
)

REPO = Path(__file__).resolve().parents[1]


def test_link_mix_draws_within_the_ranges_deterministically():
    mix = LinkMixConfig()
    specs = [mix.draw(pair_rng(0, i, d)) for i in range(400) for d in range(2)]
    assert specs == [mix.draw(pair_rng(0, i, d)) for i in range(400) for d in range(2)]
    kinds = [s.split(":")[0] for s in specs]
    for kind in ("none", "jpeg", "resize", "h264", "h265"):  # 0.2 each: 160 of 800 expected
        assert 110 < kinds.count(kind) < 210, (kind, kinds.count(kind))
    values = {k: [float(s.split(":")[1]) for s in specs if s.startswith(k)]
              for k in ("jpeg", "resize", "h264")}
    assert 5 <= min(values["jpeg"]) and max(values["jpeg"]) <= 50
    assert 0.25 <= min(values["resize"]) and max(values["resize"]) <= 0.5
    assert 30 <= min(values["h264"]) and max(values["h264"]) <= 50
    only_jpeg = LinkMixConfig(clean=0, resize=0, h264=0, h265=0, jpeg_quality=[10, 10])
    assert {only_jpeg.draw(pair_rng(1, i, 0)) for i in range(20)} == {"jpeg:10"}


def test_nordland_pool_leaves_out_the_held_out_places_and_a_gap():
    split = SplitConfig(block=100, val_every=5, val_offset=2, gap=10)  # block 2 = frames 200-299 held out
    assert not _nordland_kept(250, split)
    assert _nordland_kept(189, split)  # 189 + 10 = 199: still block 1
    assert not _nordland_kept(190, split)  # 190 + 10 = 200 reaches block 2
    assert not _nordland_kept(309, split) and _nordland_kept(310, split)  # 310 - 10 = 300: block 3
    assert not _nordland_kept(700, split) and _nordland_kept(700, None)  # block 7 = 7 mod 5 = 2


def _images(folder: Path, n: int = 12, size: tuple[int, int] = (48, 64)) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        save_image(folder / f"{i:02d}.png", rng.integers(0, 255, (*size, 3), dtype=np.uint8))
    return folder


def test_pair_store_is_encoded_once_and_deterministic(tmp_path):
    from vpr_ros.training.methods.general import SourceConfig

    recs = source_records(SourceConfig(kind="images", root=str(_images(tmp_path / "img", 6))))
    mix = LinkMixConfig()
    a = PairStore.build(recs, size=[32, 48], draws=2, seed=3, mix=mix, root=tmp_path / "s", progress=False)
    b = PairStore.build(recs, size=[32, 48], draws=2, seed=3, mix=mix, root=tmp_path / "s", progress=False)
    assert a.folder == b.folder
    assert a.specs == [[mix.draw(pair_rng(3, i, d)) for d in range(2)] for i in range(6)]
    assert a.hq.shape == (6, 32, 48, 3) and a.lq.shape == (6, 2, 32, 48, 3)
    for i, row in enumerate(a.specs):
        for d, spec in enumerate(row):
            same = np.array_equal(a.lq[i, d], a.hq[i])
            assert same == (spec == "none"), (spec, same)  # a clean draw is the image itself
    c = PairStore.build(recs, size=[32, 48], draws=2, seed=4, mix=mix, root=tmp_path / "s", progress=False)
    assert c.folder != a.folder


def test_recipe_file_validates_and_labels_are_refused():
    cfg = METHOD.load(REPO / "training" / "general_student.yaml")
    assert cfg.model.teacher == "imagenet" and cfg.model.input_size == [240, 320]
    assert cfg.loss.ickd and cfg.loss.mse and not cfg.loss.triplet
    with pytest.raises(ConfigError, match="loss.triplet"):
        METHOD.load(REPO / "training" / "general_student.yaml", ["loss.triplet=true"])
    with pytest.raises(ConfigError, match="model.crop"):
        METHOD.load(REPO / "training" / "general_student.yaml", ["model.crop=[300, 10]"])


def test_two_steps_train_a_student_whose_card_names_its_data(tmp_path):
    torch.manual_seed(0)
    teacher = create_model("structvpr_mobilenetv2", pretrained=False, preprocess={"input_size": [64, 64]})
    teacher_path = save_checkpoint(teacher, tmp_path / "teacher.pt")
    raw = {
        "data": {"sources": [{"kind": "images", "root": str(_images(tmp_path / "img")), "domain": "lab"}],
                 "draws": 2, "val_every": 4, "store": str(tmp_path / "store")},
        "model": {"input_size": [64, 64], "teacher": str(teacher_path), "crop": [32, 48]},
        "schedule": {"epochs": 1, "max_steps": 2, "batch_size": 4, "val_every": 2, "ckpt_every": 1,
                     "log_every": 1},
        "run": {"dir": str(tmp_path / "run"), "progress": False, "tensorboard": False, "device": "cpu"},
    }
    cfg = METHOD.config(raw)
    result = train_general(cfg)
    assert result.steps == 2
    assert set(result.metrics) >= {"cos_clean", "cos_lq", "self_r1_lq", "teacher_cos_lq"}
    assert -1.0 <= result.metrics["cos_lq"] <= 1.0
    out = export_general(result.checkpoint, tmp_path / "student.pt")
    card = read_card(out)
    assert card.method == "general" and card.train_domains == ["lab"] and card.input_size == (64, 64)
    assert "9 images" in card.train_data  # 12 images, 3 of them (i % 4 == 2) held out for validation
    assert card.domain("kitti00") == "out"
    student = load_model(out)
    # BatchNorm statistics stay the teacher's (freeze_bn); the convolutions moved
    bn = "features.1.conv.0.1.running_mean"
    assert torch.equal(student.state_dict()[bn], teacher.state_dict()[bn])
    conv = "features.1.conv.0.0.weight"
    assert not torch.equal(student.state_dict()[conv], teacher.state_dict()[conv])


def test_packaged_students_resolve_by_their_card_key():
    """``weights="general"`` (etc.) loads the packaged file whose card has that key; ``"default"`` the
    default student's file."""
    from vpr_ros.core.backends import model_hash
    from vpr_ros.core.models import resolve_model
    from vpr_ros.core.models.resolve import DEFAULT_KEY, PACKAGED

    assert PACKAGED["general"].is_file(), "the general student is packaged"
    for key, path in PACKAGED.items():
        if path.is_file():
            assert read_card(path).key == key
            assert model_hash(resolve_model(key)) == model_hash(load_model(path))
    default = resolve_model("default")
    assert model_hash(default) == model_hash(load_model(PACKAGED[DEFAULT_KEY]))
    assert resolve_model("general").preprocess.input_size == (240, 320)


def test_the_default_is_the_general_student():
    """Issue 17: ``weights="default"`` (and no weights at all) is the general student, read by its card."""
    from vpr_ros.core.backends import model_hash
    from vpr_ros.core.models import DEFAULT_WEIGHTS, resolve_model

    assert read_card(DEFAULT_WEIGHTS).key == "general"
    default = resolve_model("default")
    assert default.preprocess.input_size == (240, 320)
    assert model_hash(default) == model_hash(resolve_model("general")) == model_hash(resolve_model())


def test_localizer_takes_a_packaged_student_by_name():
    ext, _ = build_extractor("general", "", "", "cpu", 4, backend="torch")
    assert ext.preprocess.input_size == (240, 320) and ext.dim == 448
    with pytest.raises(Exception, match="does not exist"):
        build_extractor("no_such_student", "", "", "cpu", 4, backend="torch")


def test_gray_share_makes_whole_images_gray_for_teacher_and_link(tmp_path):
    from vpr_ros.training.methods.general import SourceConfig, to_gray_rgb

    # BT.601 luma of (100, 200, 50): 0.299*100 + 0.587*200 + 0.114*50 = 29.9 + 117.4 + 5.7 = 153
    assert to_gray_rgb(np.array([[[100, 200, 50]]], dtype=np.uint8)).tolist() == [[[153, 153, 153]]]
    recs = source_records(SourceConfig(kind="images", root=str(_images(tmp_path / "img", 8))))
    half = LinkMixConfig(gray=0.5)
    flags = [half.is_gray(3, i) for i in range(200)]
    assert flags == [half.is_gray(3, i) for i in range(200)] and 70 < sum(flags) < 130  # 100 expected
    all_gray = LinkMixConfig(gray=1.0)
    s = PairStore.build(recs, size=[32, 48], draws=2, seed=3, mix=all_gray, root=tmp_path / "s",
                        progress=False)
    for i in range(len(recs)):
        for img in (s.hq[i], s.lq[i, 0], s.lq[i, 1]):  # the clean view and every received one
            assert np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 0], img[..., 2])
    colour = PairStore.build(recs, size=[32, 48], draws=2, seed=3, mix=LinkMixConfig(), root=tmp_path / "s",
                             progress=False)
    assert colour.folder != s.folder and not np.array_equal(colour.hq[0][..., 0], colour.hq[0][..., 1])
    assert "grayscale" in all_gray.label() and "grayscale" not in LinkMixConfig().label()


def test_flip_mirrors_teacher_and_student_views_together(tmp_path):
    from vpr_ros.training.methods.general import LinkPairs, SourceConfig

    recs = source_records(SourceConfig(kind="images", root=str(_images(tmp_path / "img", 6))))
    store = PairStore.build(recs, size=[32, 48], draws=1, seed=3, mix=LinkMixConfig(clean=0.0),
                            root=tmp_path / "s", progress=False)
    pre = create_model("structvpr_mobilenetv2", pretrained=False).preprocess
    plain = LinkPairs(store, preprocess=pre, crop=None, seed=0)
    always = LinkPairs(store, preprocess=pre, crop=None, seed=0, flip=1.0)
    half = LinkPairs(store, preprocess=pre, crop=None, seed=0, flip=0.5)
    flipped = 0
    for k in range(len(store)):
        a, b, h = plain[k], always[k], half[k]
        for view in ("hq", "lq"):  # both views mirrored: the link's artefacts stay where the image's are
            assert torch.equal(b[view], a[view].flip(-1))
        assert not torch.equal(b["lq"], a["lq"])  # the pair is not symmetric: mirroring changed it
        same = torch.equal(h["hq"], a["hq"])
        assert same or torch.equal(h["hq"], b["hq"])
        assert torch.equal(h["lq"], a["lq"] if same else b["lq"])  # one decision per item, for both views
        flipped += not same
    assert 0 < flipped < len(store)  # flip 0.5: some items mirrored, some not (fixed seed)


def test_flip_outside_0_1_is_refused():
    from vpr_ros.training.methods.general import (
        GeneralConfig,
        GeneralModelConfig,
        PoolConfig,
        SourceConfig,
        validate_general,
    )

    pool = PoolConfig(sources=[SourceConfig(kind="images", root="imgs")])
    validate_general(GeneralConfig(data=pool, model=GeneralModelConfig(flip=0.5)))
    with pytest.raises(ConfigError, match="model.flip"):
        validate_general(GeneralConfig(data=pool, model=GeneralModelConfig(flip=1.5)))


def test_camera_scale_sends_the_frame_at_a_multiple_of_the_input_size(tmp_path):
    """With ``links.camera_scale`` the link encodes the image resized to s x the input size: JPEG's 8x8
    blocks reach a 32x48 input shrunk s times, so the received view is closer to the clean one than when a
    16x24 image (blocks magnified 2x) is sent at its own size."""
    from vpr_ros.training.methods.general import SourceConfig

    recs = source_records(SourceConfig(kind="images", root=str(_images(tmp_path / "img", 6, size=(16, 24)))))
    jpeg = {"clean": 0.0, "resize": 0.0, "h264": 0.0, "h265": 0.0, "jpeg_quality": [10, 10]}

    def store(mix: LinkMixConfig) -> PairStore:
        return PairStore.build(recs, size=[32, 48], draws=2, seed=1, mix=mix, root=tmp_path / "s",
                               progress=False)

    own, cam = store(LinkMixConfig(**jpeg)), store(LinkMixConfig(camera_scale=[3.0, 3.0], **jpeg))
    assert own.folder != cam.folder
    assert own.specs[0] == ["jpeg:10", "jpeg:10"] and cam.specs[0] == ["jpeg:10@3.00x", "jpeg:10@3.00x"]
    assert np.array_equal(own.hq, cam.hq)  # the teacher's view does not change

    def err(s: PairStore) -> float:
        return float(np.abs(s.lq[:, 0].astype(np.float32) - s.hq.astype(np.float32)).mean())

    assert err(cam) < 0.8 * err(own)
    assert "sent at 3-3x the input size" in LinkMixConfig(camera_scale=[3.0, 3.0]).label()
    # the key of a store without the option is the one it had before the option existed
    assert PairStore.key(recs, [32, 48], 2, 1, LinkMixConfig(**jpeg)) == own.folder.name


def test_camera_scale_range_is_checked():
    from vpr_ros.training.methods.general import GeneralConfig, PoolConfig, SourceConfig, validate_general

    pool = PoolConfig(sources=[SourceConfig(kind="images", root="imgs")])
    validate_general(GeneralConfig(data=pool, links=LinkMixConfig(camera_scale=[1.0, 2.0])))
    for bad in ([2.0, 1.0], [0.1, 1.0], [1.0]):
        with pytest.raises(ConfigError, match="links.camera_scale"):
            validate_general(GeneralConfig(data=pool, links=LinkMixConfig(camera_scale=bad)))
