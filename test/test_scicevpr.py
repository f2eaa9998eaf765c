"""SciceVPR and its Super-CricaVPR teacher: shapes, the batch-independence that makes the student deployable,
the multi-similarity loss and miner, DINOv2 weight loading, the training stages, export and loading."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vpr_ros.core.errors import ConfigError, ModelError
from vpr_ros.core.extract import DescriptorExtractor
from vpr_ros.core.models import create_model, list_models, load_model, read_checkpoint, save_checkpoint
from vpr_ros.core.models.scicevpr import (
    DINOV2_ARCHS,
    NUM_REGIONS,
    CricaTeacher,
    SciceStudent,
    TokenMixer,
    region_edges,
)
from vpr_ros.data.places import ImageRecord

SMALL = {"arch": "vits14", "image_size": [56, 56]}  # ViT-S/14, a 4x4 token grid: quick on a CPU


@pytest.fixture(scope="module")
def student() -> SciceStudent:
    torch.manual_seed(0)
    return create_model("scicevpr_dinov2", **SMALL).eval()


@pytest.fixture(scope="module")
def teacher() -> CricaTeacher:
    torch.manual_seed(0)
    return create_model("cricavpr_teacher_dinov2", **SMALL).eval()


# --------------------------------------------------------------------------- registry, shapes


def test_registered_with_dinov2_preprocessing_and_declared_dims(student, teacher):
    assert {"scicevpr_dinov2", "cricavpr_teacher_dinov2"} <= set(list_models())
    for m in (student, teacher):
        assert m.preprocess.mean == (0.485, 0.456, 0.406) and m.preprocess.std == (0.229, 0.224, 0.225)
        assert m.descriptor_dim == NUM_REGIONS * 384 == 5376
        with torch.inference_mode():
            d = m(torch.randn(3, 3, 56, 56))
        assert d.shape == (3, 5376)
        assert torch.allclose(d.norm(dim=1), torch.ones(3), atol=1e-5)
    default = create_model("scicevpr_dinov2")  # ViT-B/14 at 224x224, the paper's model
    assert default.preprocess.input_size == (224, 224) and 224 % 14 == 0
    assert default.descriptor_dim == 14 * 768 == 10752
    assert {a: c for a, (_, c) in DINOV2_ARCHS.items()} == {"vits14": 384, "vitb14": 768, "vitl14": 1024}
    assert create_model("scicevpr_dinov2", **SMALL, reduce_dim=64).descriptor_dim == 64


def test_bad_configs_are_refused():
    with pytest.raises(ModelError, match="multiples of 14"):
        create_model("scicevpr_dinov2", arch="vits14", image_size=[50, 56])
    with pytest.raises(ModelError, match="unknown DINOv2 arch"):
        create_model("scicevpr_dinov2", arch="vitz14")
    with pytest.raises(ModelError, match="layers must be in 1..12"):
        create_model("scicevpr_dinov2", **SMALL, layers=13)


def test_fusion_shapes_last_m_layers_and_channel_vs_token_mixing(student):
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        maps, cls = student.backbone_tokens(x)
        assert maps.shape == (2, 4 * 384, 4, 4) and cls.shape == (2, 4 * 384)
        # the last M=4 blocks, each through DINOv2's final norm, in block order
        outs = student.backbone.forward_intermediates(x, indices=[8, 9, 10, 11], norm=True,
                                                      return_prefix_tokens=True, intermediates_only=True)
        assert torch.equal(maps, torch.cat([o[0] for o in outs], 1))
        fmap, g = student.fuse(maps, cls)
        assert fmap.shape == (2, 384, 4, 4) and g.shape == (2, 384)
        # the 1x1 fusion is per token; the token mixer spreads a change of one token to the others
        bumped = maps.clone()
        bumped[:, :, 0, 0] += 1.0
        fused = F.relu(student.fusion(maps))
        assert torch.equal(F.relu(student.fusion(bumped))[:, :, 1:, 1:], fused[:, :, 1:, 1:])
        mixer = TokenMixer(16, 384)
        torch.nn.init.normal_(mixer.mlp[0].weight)
        a = fused.flatten(2).transpose(1, 2)
        b = F.relu(student.fusion(bumped)).flatten(2).transpose(1, 2)
        assert not torch.allclose(mixer(a)[:, 5:], mixer(b)[:, 5:])
        assert mixer(a).shape == a.shape


def test_regions_are_multi_level_gem_and_cls_is_an_option(student):
    assert region_edges(16, 3) == [0, 5, 11, 16] and region_edges(16, 2) == [0, 8, 16]  # CricaVPR's 224 px
    assert region_edges(4, 3) == [0, 1, 3, 4]
    fmap, cls = torch.rand(2, 384, 4, 4), torch.rand(2, 384)
    gem = student.gem

    def unit(t):
        return F.normalize(t, dim=1)

    with torch.no_grad():
        r = student.regions(fmap, cls)  # the default: GeM of the map and of every region, L2-normalised
        assert r.shape == (2, 14, 384)
        assert torch.allclose(r[:, 0], unit(gem(fmap)))
        assert torch.allclose(r[:, 1], unit(gem(fmap[:, :, 0:2, 0:2])))  # 2x2, row-major
        assert torch.allclose(r[:, 4], unit(gem(fmap[:, :, 2:4, 2:4])))
        assert torch.allclose(r[:, 5], unit(gem(fmap[:, :, 0:1, 0:1])))  # 3x3 on 4 cells: 0:1, 1:3, 3:4
        assert torch.allclose(r[:, 9], unit(gem(fmap[:, :, 1:3, 1:3])))
        assert torch.allclose(r[:, 13], unit(gem(fmap[:, :, 3:4, 3:4])))
    variant = create_model("scicevpr_dinov2", **SMALL, global_token="cls")  # CricaVPR-like
    with torch.no_grad():
        rc = variant.regions(fmap, cls)
        assert torch.equal(rc[:, 0], cls) and torch.allclose(rc[:, 1], variant.gem(fmap[:, :, 0:2, 0:2]))


# --------------------------------------------------------------------------- the property that matters


def test_student_descriptors_do_not_depend_on_the_batch_but_the_teachers_do(student, teacher):
    torch.manual_seed(1)
    x = torch.randn(16, 3, 56, 56)
    perm = torch.randperm(16)
    where = int((perm == 0).nonzero())

    def views(model):
        with torch.inference_mode():
            alone = model(x[:1])[0]
            return alone, [model(x[:2])[0], model(x)[0], model(x[perm])[where]]

    alone, others = views(student)
    for d in others:  # batch of 2, batch of 16, shuffled batch of 16
        assert torch.allclose(d, alone, atol=1e-5, rtol=0)
    alone, others = views(teacher)
    for d in others:  # cross-image attention: another batch gives another descriptor
        assert (d - alone).abs().max() > 1e-3


# --------------------------------------------------------------------------- multi-similarity loss and miner


def _four():
    # unit vectors at 0, 36.87, 53.13 and 90 degrees:
    # S01 = .8, S02 = .6, S03 = 0, S12 = .96, S13 = .6, S23 = .8
    e = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0]])
    return e, torch.tensor([0, 0, 1, 1])


def test_ms_miner_keeps_the_hand_computed_pairs():
    from vpr_ros.training.methods.scicevpr import ms_mine

    e, labels = _four()
    pos, neg = ms_mine(e @ e.T, labels, epsilon=0.1)
    # anchor 0: positive 1 (.8 - .1 = .7) is not below its hardest negative (.6): nothing; negatives .6, 0 are
    # not above its positive - .1 ... (.6 + .1 = .7 < .8): nothing. Anchor 1: hardest negative 2 (.96) keeps
    # positive 0 (.7 < .96) and negative 2 (1.06 > .8) but not 3 (.7). Anchors 2, 3 mirror 1, 0.
    assert {tuple(p) for p in pos.nonzero().tolist()} == {(1, 0), (2, 3)}
    assert {tuple(n) for n in neg.nonzero().tolist()} == {(1, 2), (2, 1)}


def test_ms_loss_matches_the_hand_computation():
    from vpr_ros.training.methods.scicevpr import multi_similarity_loss

    e, labels = _four()
    a, b, lam = 2.0, 10.0, 0.5
    loss, stats = multi_similarity_loss(e, labels, alpha=a, beta=b, base=lam, epsilon=0.1)
    # anchors 1 and 2 each: 1/a log(1 + exp(-a(.8 - lam))) + 1/b log(1 + exp(b(.96 - lam))); 0 and 3 add 0
    one = math.log(1 + math.exp(-a * (0.8 - lam))) / a + math.log(1 + math.exp(b * (0.96 - lam))) / b
    assert loss.item() == pytest.approx(2 * one / 4, abs=1e-6)
    assert loss.item() == pytest.approx(0.339872, abs=1e-5)
    assert stats == {"pos_pairs": 2 / 4, "neg_pairs": 2 / 8}
    # without the miner every pair counts; anchor 0: positive .8, negatives .6, 0
    full, _ = multi_similarity_loss(e, labels, alpha=a, beta=b, base=lam, mine=False)
    l0 = math.log(1 + math.exp(-a * 0.3)) / a + math.log(1 + math.exp(b * 0.1) + math.exp(b * -0.5)) / b
    l1 = math.log(1 + math.exp(-a * 0.3)) / a + math.log(1 + math.exp(b * 0.46) + math.exp(b * 0.1)) / b
    assert full.item() == pytest.approx((2 * l0 + 2 * l1) / 4, abs=1e-6)  # anchors 3, 2 mirror 0, 1
    # gradients flow and push positives together
    e = e.clone().requires_grad_(True)
    multi_similarity_loss(F.normalize(e, dim=1), labels, mine=False)[0].backward()
    assert torch.isfinite(e.grad).all() and e.grad.abs().sum() > 0


# --------------------------------------------------------------------------- DINOv2 weights


def _known_state(arch: str = "vits14") -> dict[str, torch.Tensor]:
    import timm

    net = timm.create_model(DINOV2_ARCHS[arch][0], pretrained=False, num_classes=0)
    gen = torch.Generator().manual_seed(7)
    return {k: torch.randn(v.shape, generator=gen) * 0.02 for k, v in net.state_dict().items()}


def _hub_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # the official checkpoint (dinov2_vits14_pretrain.pth) has the same block names plus a mask token
    return {**state, "mask_token": torch.zeros(1, state["cls_token"].shape[-1])}


@pytest.mark.parametrize("style", ["timm", "hub"])
def test_backbone_weights_load_from_a_local_file(tmp_path, style):
    known = _known_state()
    path = tmp_path / f"dinov2_{style}.pth"
    torch.save(known if style == "timm" else _hub_names(known), path)
    model = create_model("scicevpr_dinov2", pretrained=True, **SMALL, backbone_weights=str(path))
    got = model.backbone.state_dict()
    assert got.keys() == known.keys()
    assert all(torch.equal(got[k], known[k]) for k in known)
    assert not any(p.requires_grad for p in model.backbone.parameters())  # frozen
    # without pretrained the file is not read (a checkpoint's own weights are loaded afterwards)
    fresh = create_model("scicevpr_dinov2", pretrained=False, **SMALL, backbone_weights=str(path))
    assert not torch.equal(fresh.backbone.cls_token, known["cls_token"])


def test_hub_weights_come_from_the_torch_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    known = _known_state()
    ckpt = tmp_path / "hub" / "checkpoints" / "dinov2_vits14_pretrain.pth"
    ckpt.parent.mkdir(parents=True)
    torch.save(_hub_names(known), ckpt)
    model = create_model("scicevpr_dinov2", pretrained=True, **SMALL, backbone_weights="hub")
    assert torch.equal(model.backbone.blocks[3].attn.qkv.weight, known["blocks.3.attn.qkv.weight"])


def test_missing_weights_give_clear_errors(tmp_path, monkeypatch):
    import huggingface_hub.constants

    with pytest.raises(ModelError, match="not found"):
        create_model("scicevpr_dinov2", pretrained=True, **SMALL, backbone_weights=str(tmp_path / "no.pth"))
    bad = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(3)}, bad)
    with pytest.raises(ModelError, match="not DINOv2 vits14 weights"):
        create_model("scicevpr_dinov2", pretrained=True, **SMALL, backbone_weights=str(bad))
    # offline with nothing cached: timm's pretrained tag cannot be fetched, and we say what to do
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelError, match="set backbone_weights to a local file"):
        create_model("scicevpr_dinov2", pretrained=True, **SMALL)


# --------------------------------------------------------------------------- reduction, checkpoints


def test_pca_reduction_lives_in_the_checkpoint_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model = create_model("scicevpr_dinov2", **SMALL, reduce_dim=8).eval()
    x = torch.randn(12, 3, 56, 56)
    with torch.no_grad():
        full = model.full_descriptor(x)
    model.fit_reduction(full)
    assert bool(model.reduce_fitted)
    with torch.no_grad():
        d = model(x)
        # the projection is the PCA: centred descriptors onto the top principal directions
        _, _, vh = torch.linalg.svd((full - full.mean(0)).double(), full_matrices=False)
        ref = F.normalize(((full - full.mean(0)).double() @ vh[:8].T).float(), dim=1)
    signs = torch.sign((d * ref).sum(0))  # a principal direction's sign is arbitrary
    assert torch.allclose(d, ref * signs, atol=1e-4)
    with pytest.raises(ModelError, match="at least 8"):
        model.fit_reduction(full[:4])
    path = save_checkpoint(model, tmp_path / "scice.pt")
    loaded = load_model(path, expected_name="scicevpr_dinov2")
    assert loaded.descriptor_dim == 8 and loaded.preprocess == model.preprocess
    with torch.no_grad():
        assert torch.allclose(loaded(x), d, atol=1e-6)
    # the core extractor (what the localizer and the map builder use) runs it unchanged
    images = [np.random.default_rng(i).integers(0, 255, (90, 120, 3), dtype=np.uint8) for i in range(3)]
    out = DescriptorExtractor(loaded, device="cpu", batch_size=2)(images)
    assert out.shape == (3, 8) and np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)


# --------------------------------------------------------------------------- training


def _synthetic_places(root: Path, n: int = 48) -> Path:
    """database/ + queries/ with @utm@ names: one place every 10 m, a query and a database image of each."""
    rng = np.random.default_rng(0)
    for sub in ("database", "queries"):
        (root / sub).mkdir(parents=True)
    for i in range(n):
        coarse = rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)
        base = cv2.resize(coarse, (64, 48), interpolation=cv2.INTER_NEAREST).astype(int)
        for sub, noise in (("database", 0), ("queries", 20)):
            im = np.clip(base + rng.integers(-noise, noise + 1, base.shape), 0, 255).astype(np.uint8)
            cv2.imwrite(str(root / sub / f"@{10.0 * i:.1f}@0.0@33@T@{i:03d}.png"), im)
    return root


def _recipe(tmp_path: Path, stage: str, **over) -> dict:
    cfg = {
        "stage": stage,
        "data": {"kind": "folder", "root": str(tmp_path / "places"), "pos_radius_m": 5.0,
                 "neg_radius_m": 25.0, "split": {"block": 60.0, "val_every": 4, "val_offset": 1, "gap": 0.0}},
        "model": {"name": "cricavpr_teacher_dinov2" if stage == "teacher" else "scicevpr_dinov2",
                  "config": {"arch": "vits14", "image_size": [42, 56], "mixer_layers": 1}},
        "places": {"images_per_place": 2},
        "optim": {"lr": 1e-3},
        "schedule": {"max_steps": 2, "batch_size": 4, "log_every": 1, "ckpt_every": 1},
        "run": {"dir": str(tmp_path / f"run_{stage}"), "progress": False, "tensorboard": False,
                "device": "cpu", "recall_ns": [1, 5]},
    }
    for key, value in over.items():
        section, name = key.split(".")
        cfg[section][name] = value
    return cfg


def test_config_errors_name_the_key(tmp_path):
    from vpr_ros.training.methods.scicevpr import METHOD

    scice_config = METHOD.config

    with pytest.raises(ConfigError, match="model.teacher"):
        scice_config(_recipe(tmp_path, "student"))
    with pytest.raises(ConfigError, match="data.mining"):
        scice_config(_recipe(tmp_path, "teacher"), ["data.mining=hard"])
    with pytest.raises(ConfigError, match="unknown config key 'loss.margin'"):
        scice_config(_recipe(tmp_path, "teacher"), ["loss.margin=0.3"])
    with pytest.raises(ConfigError, match="stage"):
        scice_config(_recipe(tmp_path, "teacher"), ["stage=both"])


def test_place_batches_hold_distinct_places_and_are_reproducible():
    from vpr_ros.data.places import GroundTruth, PlaceDataset
    from vpr_ros.training.methods.scicevpr import PlaceBatchSampler

    recs = [ImageRecord(path=Path(f"{i}.png"), name=str(i), frame_index=i) for i in range(200)]
    places = PlaceDataset("frames", list(recs), recs, GroundTruth("frame", tolerance=2, negatives_beyond=10))
    groups = list(range(200))
    sampler = PlaceBatchSampler(places, groups, places_per_batch=8, seed=3, rank=0, world=1)
    order = list(sampler)
    assert len(order) == len(sampler) == 200 // 8 * 8
    for s in range(0, len(order), 8):
        block = order[s:s + 8]
        # no place's positives (+-2 frames) lie within another's near range (+-10 frames): > 12 frames apart
        assert min(abs(a - b) for i, a in enumerate(block) for b in block[i + 1:]) > 12
    assert list(PlaceBatchSampler(places, groups, places_per_batch=8, seed=3)) == order
    sampler.set_epoch(1)
    assert list(sampler) != order
    halves = [list(PlaceBatchSampler(places, groups, places_per_batch=8, seed=3, rank=r, world=2))
              for r in (0, 1)]
    assert len(halves[0]) == len(halves[1]) == 200 // 16 * 8 and halves[0] != halves[1]
    assert halves[0][:8] == order[:8] and halves[1][:8] == order[8:16]  # every world-th block


def test_two_stages_train_export_and_load(tmp_path):
    from vpr_ros.cli.train import main
    from vpr_ros.training.methods.scicevpr import METHOD, train_scicevpr

    scice_config, load_scice_config = METHOD.config, METHOD.load

    _synthetic_places(tmp_path / "places")
    torch.manual_seed(0)
    r1 = train_scicevpr(scice_config(_recipe(tmp_path, "teacher")))
    assert r1.steps == 2 and (r1.run_dir / "train.csv").is_file() and "R@1" in r1.metrics
    t_ckpt = read_checkpoint(r1.checkpoint)
    assert t_ckpt["model"]["name"] == "cricavpr_teacher_dinov2" and t_ckpt["meta"]["stage"] == "teacher"
    # resume continues the same run to a later final step
    more = scice_config(_recipe(tmp_path, "teacher"), ["schedule.max_steps=3"])
    assert train_scicevpr(more, resume=True).steps == 3

    rec2 = _recipe(tmp_path, "student", **{"model.teacher": str(r1.checkpoint), "model.pca_images": 16})
    rec2["model"]["config"]["reduce_dim"] = 8
    (tmp_path / "stage2.yaml").write_text(__import__("yaml").safe_dump(rec2))
    r2 = train_scicevpr(load_scice_config(tmp_path / "stage2.yaml"))
    rows = (r2.run_dir / "train.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert {"loss", "ms", "distill"} <= set(header) and len(rows) == 3
    assert all(math.isfinite(float(r.split(",")[header.index("distill")])) for r in rows[1:])
    assert "pca8/R@1" in r2.metrics
    ckpt = read_checkpoint(r2.checkpoint)
    teacher = load_model(r1.checkpoint)
    student = load_model(r2.checkpoint)
    # the fusion came from the teacher and stayed frozen; the backbone is the teacher's
    assert torch.equal(student.fusion.weight, teacher.fusion.weight)
    assert torch.equal(student.backbone.pos_embed, teacher.backbone.pos_embed)
    assert bool(student.reduce_fitted) and ckpt["kind"] == "training"

    out = tmp_path / "scicevpr.pt"
    assert main(["export", str(r2.checkpoint), str(out)]) == 0
    deployed = read_checkpoint(out)
    assert deployed["kind"] == "deployed" and deployed["meta"]["method"] == "scicevpr"
    model = load_model(out, expected_name="scicevpr_dinov2")
    assert model.descriptor_dim == 8 and model.preprocess.input_size == (42, 56)
    x = torch.randn(3, 3, 42, 56)
    with torch.no_grad():
        assert torch.allclose(model(x), student(x), atol=1e-6)
    assert main(["plot-losses", str(r1.run_dir), str(r2.run_dir), "--out", str(tmp_path / "curves.png")]) == 0
    assert (tmp_path / "curves.png").stat().st_size > 1000
