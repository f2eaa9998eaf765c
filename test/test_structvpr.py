"""StructVPR units: SLME encoding, group partition, the weights phi (Eq. 4), the weighted KD loss, the
seg-branch, Stage II's module and the recipe."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vpr_ros.core.errors import ConfigError
from vpr_ros.training.methods.structvpr.partition import (
    Pairs,
    group_of,
    group_shares,
    keep_mask,
)
from vpr_ros.training.methods.structvpr.seg_branch import SegBranch
from vpr_ros.training.methods.structvpr.segmentation import CITYSCAPES_CLASSES
from vpr_ros.training.methods.structvpr.slme import SLMEConfig, SLMEncoder
from vpr_ros.training.methods.structvpr.weighted_kd import (
    PairWeights,
    StructVPRDistill,
    WeightingConfig,
    pair_weights,
)

CS = {name: i for i, name in enumerate(CITYSCAPES_CLASSES)}

# --------------------------------------------------------------------------- SLME


def test_slme_default_is_the_papers_six_groups_and_weights():
    enc = SLMEncoder(SLMEConfig(), CITYSCAPES_CLASSES)
    assert enc.names == ["vegetation", "dynamic", "sky", "ground", "buildings", "objects"]
    assert enc.weights.tolist() == [0.5, 0.5, 1.0, 1.0, 2.0, 2.0]
    expect = {"vegetation": 0, "terrain": 0, "person": 1, "car": 1, "bicycle": 1, "train": 1, "sky": 2,
              "road": 3, "sidewalk": 3, "building": 4, "wall": 4, "fence": 4, "pole": 5,
              "traffic light": 5, "traffic sign": 5, "background": -1}
    assert {c: int(enc.table[CS[c]]) for c in expect} == expect
    assert (enc.table[:19] >= 0).all(), "every Cityscapes class has a group"


def test_slme_is_weighted_one_hot():
    enc = SLMEncoder(SLMEConfig(), CITYSCAPES_CLASSES)
    labels = np.array([[CS["road"], CS["sky"], CS["car"]],
                       [CS["building"], CS["pole"], CS["background"]]], dtype=np.uint8)
    m = enc(labels)
    assert m.shape == (6, 2, 3) and m.dtype == np.float32
    # exactly one channel per grouped pixel, holding its group's weight; background is all-zero
    assert ((m > 0).sum(0) == np.array([[1, 1, 1], [1, 1, 0]])).all()
    assert m[3, 0, 0] == 1.0 and m[2, 0, 1] == 1.0 and m[1, 0, 2] == 0.5
    assert m[4, 1, 0] == 2.0 and m[5, 1, 1] == 2.0 and m[:, 1, 2].sum() == 0.0
    # resizing keeps it one-hot (nearest neighbour, no blending)
    big = enc(np.repeat(np.repeat(labels, 8, 0), 8, 1), size=(4, 6))
    assert big.shape == (6, 4, 6) and set(np.unique(big).tolist()) <= {0.0, 0.5, 1.0, 2.0}
    assert ((big > 0).sum(0) <= 1).all()


def test_slme_three_group_variant_and_custom_tables():
    enc3 = SLMEncoder(SLMEConfig.preset(3), CITYSCAPES_CLASSES)
    assert enc3.channels == 3 and enc3.weights.tolist() == [0.5, 1.0, 2.0]
    assert [int(enc3.table[CS[c]]) for c in ("vegetation", "car", "sky", "road", "building", "pole")] == [
        0, 0, 1, 1, 2, 2]
    custom = SLMEConfig({"flat": ["road"], "rest": ["building", "sky"]}, [1.0, 3.0], [4, 4])
    m = SLMEncoder(custom, CITYSCAPES_CLASSES)(np.full((8, 8), CS["sky"], np.uint8))
    assert m.shape == (2, 4, 4) and (m[1] == 3.0).all() and (m[0] == 0).all()


@pytest.mark.parametrize("cfg, text", [
    (SLMEConfig({"a": ["road"]}, [1.0, 2.0]), "2 weights for 1 groups"),
    (SLMEConfig({"a": ["roadd"]}, [1.0]), "'roadd' is not one of"),
    (SLMEConfig({"a": ["road"], "b": ["road"]}, [1.0, 1.0]), "already in group 'a'"),
    (SLMEConfig({"a": ["road"]}, [-1.0]), ">= 0"),
])
def test_slme_bad_tables_are_config_errors(cfg, text):
    with pytest.raises(ConfigError, match=text):
        SLMEncoder(cfg, CITYSCAPES_CLASSES)
    with pytest.raises(ConfigError):
        SLMEConfig.preset(4)


# --------------------------------------------------------------------------- partition


@pytest.mark.parametrize("x, y, group", [
    (1, 1, "D2"), (10, 10, "D2"), (4, 5, "D2"),      # x <= y <= N_t (ties go to D2)
    (5, 4, "D3"), (10, 9, "D3"), (2, 1, "D3"),       # y < x <= N_t
    (10, 11, "D1"), (1, 500, "D1"),                  # x <= N_t < y
    (11, 1, "D4"), (11, 11, "D4"), (11, 12, "D4"), (400, 3, "D4"),  # x > N_t
])
def test_group_boundaries(x, y, group):
    assert ["D1", "D2", "D3", "D4"][int(group_of(x, y, n_t=10))] == group


def test_partition_variants_and_shares():
    x = np.array([1, 10, 11, 5, 3])
    y = np.array([1, 20, 2, 4, 30])
    assert keep_mask(x, y, "gp-d").tolist() == [True, True, False, True, True]
    assert keep_mask(x, y, "gp-s").tolist() == [True, True, False, True, True]
    assert keep_mask(x, y, "gp-r").tolist() == [True, False, True, True, False]
    assert keep_mask(x, y, "all").all()
    shares = group_shares(Pairs(np.arange(5), np.arange(5), x, y))
    assert shares == {"D1": 0.4, "D2": 0.2, "D3": 0.2, "D4": 0.2}
    with pytest.raises(ValueError, match="unknown partition"):
        keep_mask(x, y, "gp-x")


# --------------------------------------------------------------------------- phi and the weighted loss


def test_pair_weights_constant_ones_and_lookup():
    q, p = np.array([0, 0, 1, 2]), np.array([5, 6, 7, 8])
    pairs = Pairs(q, p, x=np.array([2, 1, 4, 12]), y=np.array([40, 1, 3, 1]))
    # groups: D1, D2, D3, D4
    assert pair_weights(pairs, WeightingConfig("gp-d", "constant")).tolist() == [8.0, 4.0, 1.0, 0.0]
    assert pair_weights(pairs, WeightingConfig("all", "ones")).tolist() == [1.0, 1.0, 1.0, 1.0]
    assert pair_weights(pairs, WeightingConfig("gp-r", "ones")).tolist() == [0.0, 1.0, 1.0, 1.0]
    assert pair_weights(pairs, WeightingConfig("gp-s", "ones")).tolist() == [1.0, 1.0, 1.0, 0.0]
    lookup = PairWeights(pairs, pair_weights(pairs, WeightingConfig()))
    # (0, 5) is D1 (x 2, y 40): 1 + (20 - 2) / (4 ln 3) = 1 + 18 / 4.394449 = 5.096077
    assert lookup(0, 5) == pytest.approx(5.096077) and lookup(2, 8) == 0.0 and lookup(9, 9) == 0.0
    with pytest.raises(ValueError):
        pair_weights(pairs, WeightingConfig("gp-d", "constant", constant=[1.0, 2.0]))


# --------------------------------------------------------------------------- the branches and Stage II


def test_seg_branch_is_480d_multilevel_and_registered(tmp_path):
    from vpr_ros.core.models import create_model, model_from_checkpoint, read_checkpoint, save_checkpoint

    net = SegBranch(in_channels=6)
    x = torch.rand(2, 6, 64, 192)
    maps = net.forward_features(x)
    assert [m.shape[1] for m in maps] == [96, 128, 256] and [m.shape[2] for m in maps] == [8, 4, 2]
    d = net(x)
    assert d.shape == (2, 480) and torch.allclose(d.norm(dim=1), torch.ones(2), atol=1e-5)
    m = create_model("structvpr_segbranch", in_channels=3)
    assert m.descriptor_dim == 480 and m.stages[0][0][0].in_channels == 3
    back = model_from_checkpoint(read_checkpoint(save_checkpoint(m, tmp_path / "seg.pt")))
    assert back.config["in_channels"] == 3
    with pytest.raises(Exception, match="no pretrained"):
        create_model("structvpr_segbranch", pretrained=True)


def test_stage2_trains_student_and_T_never_the_seg_branch():
    from vpr_ros.core.models import create_model

    student, teacher = create_model("structvpr_mobilenetv2"), SegBranch()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    kd = StructVPRDistill(student, teacher, kd_weight=1.0, margin=0.1)
    assert kd.proj.in_features == 448 and kd.proj.out_features == 480  # T: student -> seg-branch space
    kd.train()
    assert not teacher.training
    out = kd(torch.rand(2, 3, 3, 64, 64), torch.rand(2, 3, 6, 64, 64), torch.tensor([1.5, 0.0]))
    assert set(out) == {"loss", "triplet", "kd"} and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert kd.proj.weight.grad is not None and next(student.parameters()).grad is not None
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items()), "BN statistics moved"
    no_kd = StructVPRDistill(create_model("structvpr_mobilenetv2"), SegBranch(), kd_weight=0.0)
    assert set(no_kd(torch.rand(2, 3, 3, 64, 64), torch.rand(2, 3, 6, 64, 64), torch.ones(2))) == {
        "loss", "triplet"}


# --------------------------------------------------------------------------- the recipe


def test_recipe_loads_and_rejects_bad_keys():
    from pathlib import Path

    from vpr_ros.training.methods.structvpr.pipeline import config_from_dict, load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "training" / "structvpr_kitti.yaml")
    assert cfg.stage2.weighting.n_t == 10 and cfg.stage2.weighting.n_m == 20
    assert list(cfg.slme.groups) == ["vegetation", "dynamic", "sky", "ground", "buildings", "objects"]
    with pytest.raises(ConfigError, match="stage2.init"):
        config_from_dict({"stage2": {"init": "random"}})
    with pytest.raises(ConfigError, match="stage2.weighting.rank"):
        config_from_dict({"stage2": {"weighting": {"rank": "top"}}})
    with pytest.raises(ConfigError, match="stage2.sampling"):
        config_from_dict({"stage2": {"sampling": "random"}})
    with pytest.raises(ConfigError, match="stage2.weighting.weighting"):
        config_from_dict({"stage2": {"weighting": {"weighting": "phi2"}}})
    with pytest.raises(ConfigError, match="unknown config key 'stage2.nt'"):
        config_from_dict({"stage2": {"nt": 3}})
    with pytest.raises(ConfigError, match="places.kind"):
        config_from_dict({"places": {"kind": "mars"}})
    with pytest.raises(ConfigError, match="test_offsets"):
        config_from_dict({"places": {"test_step": 5, "test_offsets": [5]}})


def test_projection_starts_at_the_least_squares_map():
    from vpr_ros.training.methods.structvpr.weighted_kd import init_projection

    rng = np.random.default_rng(0)
    t = rng.normal(size=(200, 6)).astype(np.float32)
    true_w, true_b = rng.normal(size=(6, 4)), rng.normal(size=4)
    s = (t @ true_w + true_b).astype(np.float32)
    proj = torch.nn.Linear(6, 4)
    residual = init_projection(proj, t, s, ridge=1e-6)
    assert residual < 1e-6
    assert np.allclose(proj.weight.detach().numpy(), true_w.T, atol=1e-3)
    assert np.allclose(proj(torch.from_numpy(t)).detach().numpy(), s, atol=1e-3)


def test_paper_defaults_and_the_cpu_budget_recipe():
    """The defaults are the paper's (Sec. 4.2, 4.3, 3.5); the CPU recipe differs from the paper's KITTI
    recipe only in the input and SLME sizes (and its run directory)."""
    from dataclasses import asdict
    from pathlib import Path

    from vpr_ros.training.methods.structvpr.pipeline import config_from_dict, load_config

    cfg = config_from_dict({})
    assert cfg.input_size == [480, 640] and cfg.slme.size is None  # 640x480; SLME as large as the input
    assert cfg.slme.weights == [0.5, 0.5, 1.0, 1.0, 2.0, 2.0] and len(cfg.slme.groups) == 6  # C = 6
    w = cfg.stage2.weighting
    assert (w.partition, w.weighting, w.n_t, w.n_m, w.rank) == ("gp-d", "phi", 10, 20, "list")
    assert (cfg.stage2.init, cfg.stage2.t_init, cfg.stage2.sampling) == ("imagenet", "random", "pairs")
    assert cfg.stage2.kd_weight == 1.0 and cfg.degradation.specs == ["none"]  # Eq. 6; clean training
    root = Path(__file__).resolve().parents[1] / "training"
    paper, cpu = load_config(root / "structvpr_kitti.yaml"), load_config(root / "structvpr_kitti_cpu.yaml")
    assert paper.input_size == [480, 640] and paper.slme.size is None and paper.degradation.specs == ["none"]
    assert cpu.input_size == [96, 320] and cpu.slme.size == [48, 160]
    a, b = asdict(paper), asdict(cpu)
    assert {k for k in a if a[k] != b[k]} == {"input_size", "slme", "dir"}
    assert {k for k in a["slme"] if a["slme"][k] != b["slme"][k]} == {"size"}


def test_pair_sampling_covers_every_group(kitti_dir):
    """Stage II draws every (q, p) pair of the partition once per epoch, so D1-D4 appear in their shares;
    the hardest-positive option is the engine's one tuple per query."""
    from vpr_ros.core.models.registry import Preprocess
    from vpr_ros.training.data import Degrader
    from vpr_ros.training.methods.structvpr.pipeline import PlacesConfig, StructTuples, kitti_train_places

    places = kitti_train_places(PlacesConfig(root=str(kitti_dir), every=3))
    q = np.concatenate([np.full(len(p), i) for i, p in enumerate(places.positives())])
    p = np.concatenate([np.asarray(p) for p in places.positives()])
    n = len(q)
    x, y = np.tile([1, 2, 5, 30], n)[:n], np.tile([20, 1, 9, 2], n)[:n]  # D1, D3, D2, D4 in turn
    pairs = Pairs(q, p, x, y)
    common = dict(preprocess=Preprocess(input_size=(32, 32)), degrader=Degrader(["none"]), negatives=2)
    ds = StructTuples(places, None, rgb=False, pairs=pairs, **common)
    assert len(ds) == n
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        drawn = [ds.tuple_ids(k)[:2] for k in range(len(ds))]
        assert sorted(drawn) == sorted(zip(q.tolist(), p.tolist(), strict=True)), "every pair once"
    groups = [ds[k]["group"] for k in range(len(ds))]
    expect = np.bincount(group_of(x, y), minlength=4).tolist()
    assert np.bincount(groups, minlength=4).tolist() == expect and min(expect) > 0
    best = StructTuples(places, None, rgb=False, pairs=pairs, sampling="hardest-positive", **common)
    assert len(best) == len(places.queries) - sum(len(pp) == 0 for pp in places.positives())
