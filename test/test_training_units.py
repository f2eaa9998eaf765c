"""Training units without data: recipe validation, the three LoQI losses on hand-made tensors, the
two branches of the method (student = teacher at start, frozen teacher, model-agnostic)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from vpr_ros.core.config_file import expand_env
from vpr_ros.core.errors import ConfigError, ModelError
from vpr_ros.core.models import create_model, save_checkpoint
from vpr_ros.training.config import save_recipe
from vpr_ros.training.engine import LrSchedule
from vpr_ros.training.losses import channel_correlation, correlation, ickd_loss, mse_loss, triplet_loss
from vpr_ros.training.methods.loqi import LoQI, TrainConfig, build_branches, config_from_dict, load_config

REPO = Path(__file__).resolve().parents[1]
BASE = {"data": {"root": "/data/x"}, "model": {"teacher": "imagenet"}}


# --------------------------------------------------------------------------- config


def test_recipes_in_repo_validate(monkeypatch):
    monkeypatch.setenv("VPR_ROS_SHARED", "/somewhere/shared")
    for path in [
        REPO / "training" / "loqi_nordland_jpeg10.yaml",
        REPO / "training" / "teacher_nordland.yaml",
    ]:
        cfg = load_config(path)
        if cfg.data.kind == "nordland":
            assert cfg.data.root.startswith("/somewhere/shared/"), path


def test_unknown_key_names_dotted_path_and_valid_keys():
    with pytest.raises(ConfigError) as exc:
        config_from_dict({**BASE, "loss": {"ickd": True, "icdk_weight": 2.0}})
    msg = str(exc.value)
    assert "'loss.icdk_weight'" in msg and "ickd_weight" in msg and "alpha" in msg
    with pytest.raises(ConfigError, match=r"'data\.split\.blok'.*block"):
        config_from_dict(BASE, ["data.split.blok=3"])
    with pytest.raises(ConfigError, match="unknown config key 'trainer'"):
        config_from_dict({**BASE, "trainer": {}})


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("optim.lr=fast", r"optim\.lr: expected a number"),
        ("loss.ickd=1", r"loss\.ickd: expected true or false"),
        ("schedule.batch_size=2.5", r"schedule\.batch_size: expected an integer"),
        ("optim.lr=-1", r"optim\.lr: must be > 0"),
        ("data.split.val_offset=7", r"data\.split\.val_offset: must be in 0\.\.4"),
        ("data.neg_frames=1", r"data\.neg_frames: must be >= data\.pos_frames"),
        ("degradation.specs=[jpeg:500]", r"degradation\.specs\[0\]: .*jpeg_quality"),
        ("data.kind=video", r"data\.kind: 'video' is not one of"),
        ("model.input_size=[8,8]", r"model\.input_size"),
        ("loss.triplet=false", None),
    ],
)
def test_bad_values_are_named(override, pattern):
    if pattern is None:  # distillation alone is a valid combination
        config_from_dict(BASE, [override])
        return
    with pytest.raises(ConfigError, match=pattern):
        config_from_dict(BASE, [override])


def test_distillation_needs_a_teacher_and_some_loss():
    with pytest.raises(ConfigError, match="model.teacher"):
        config_from_dict({"data": {"root": "x"}, "model": {"init": "imagenet", "teacher": None}})
    cfg = config_from_dict(
        {
            "data": {"root": "x"},
            "model": {"init": "imagenet", "teacher": None},
            "loss": {"ickd": False, "mse": False},
        }
    )
    assert not cfg.distills
    with pytest.raises(ConfigError, match="enable at least one"):
        config_from_dict(BASE, ["loss.ickd=false", "loss.mse=false", "loss.triplet=false"])


def test_env_expansion_and_saved_config_round_trip(tmp_path, monkeypatch):
    monkeypatch.delenv("VPR_TEST_UNSET", raising=False)
    assert expand_env("${VPR_TEST_UNSET:-../shared}/data") == "../shared/data"
    monkeypatch.setenv("VPR_TEST_SET", "/mnt/s")
    assert expand_env("${VPR_TEST_SET:-../shared}/data") == "/mnt/s/data"
    with pytest.raises(ConfigError, match="VPR_TEST_UNSET is not set"):
        expand_env("${VPR_TEST_UNSET}")
    cfg = config_from_dict(BASE, ["optim.lr=3e-4", "degradation.specs=[jpeg:10, resize:0.5]"])
    assert cfg.optim.lr == 3e-4 and cfg.degradation.specs == ["jpeg:10", "resize:0.5"]
    save_recipe(cfg, tmp_path / "config.yaml")
    again = config_from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert again == cfg and isinstance(again, TrainConfig)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_lr_schedule():
    cos = LrSchedule("cosine", total=10, warmup=2)
    assert cos(0) == 0.5 and cos(1) == 1.0 and cos(2) == 1.0 and abs(cos(10)) < 1e-12
    assert LrSchedule("step", total=10, step_size=3, gamma=0.5)(7) == 0.25
    assert LrSchedule("constant", total=10)(9) == 1.0


# --------------------------------------------------------------------------- losses


def test_ickd_zero_for_identical_maps_and_positive_otherwise():
    torch.manual_seed(0)
    maps = [torch.randn(2, 8, 5, 7), torch.randn(2, 16, 3, 4)]
    assert ickd_loss(maps, [m.clone() for m in maps]).item() == pytest.approx(0.0, abs=1e-7)
    other = [torch.randn_like(m) for m in maps]
    assert ickd_loss(maps, other).item() > 0.05


def test_ickd_invariances():
    """Channel correlations ignore a positive rescaling and any shuffling of the spatial positions (and so
    the spatial size); permuting channels, which changes the channel relations, is detected."""
    torch.manual_seed(1)
    t = torch.randn(3, 6, 4, 5)
    perm = torch.randperm(20)
    shuffled = t.flatten(2)[:, :, perm].view_as(t)
    assert ickd_loss([3.7 * t], [t]).item() == pytest.approx(0.0, abs=1e-6)
    assert ickd_loss([shuffled], [t]).item() == pytest.approx(0.0, abs=1e-6)
    wide = torch.cat([t.flatten(2), t.flatten(2)], dim=2).view(3, 6, 5, 8)  # every position twice
    assert ickd_loss([wide], [t]).item() == pytest.approx(0.0, abs=1e-6)
    assert ickd_loss([t[:, torch.tensor([1, 0, 2, 3, 4, 5])]], [t]).item() > 1e-3


def test_ickd_hand_computed_value_and_gradient_to_student_only():
    # one 2-channel map of 2 positions: G = F F^T, rows normalised, ||G_s - G_t||^2 / C
    s = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]], requires_grad=True)  # orthogonal channels -> G = I
    t = torch.tensor([[[[1.0, 0.0]], [[1.0, 0.0]]]], requires_grad=True)  # identical channels -> G = 1
    g_t = channel_correlation(t)[0]
    assert torch.allclose(g_t, torch.full((2, 2), 1 / math.sqrt(2)))
    expected = ((1 - 1 / math.sqrt(2)) ** 2 * 2 + (1 / math.sqrt(2)) ** 2 * 2) / 2
    loss = ickd_loss([s], [t])
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None


def _reference_ickd(student_maps, teacher_maps):
    """ICKD as first written: dense C x C correlations of both sides, their squared difference."""
    out = [
        (channel_correlation(s) - channel_correlation(t.detach())).pow(2).sum(dim=(1, 2)).mean() / s.shape[1]
        for s, t in zip(student_maps, teacher_maps, strict=True)
    ]
    return torch.stack(out).mean()


@pytest.mark.parametrize(
    "shapes",
    [
        [(5, 32, 4, 8), (5, 96, 2, 4), (5, 320, 1, 2)],  # StructVPR's maps at 32x64 (96 and 320: factored)
        [(2, 32, 30, 40), (2, 96, 15, 20), (2, 320, 8, 10)],  # at 240x320 (320: factored)
    ],
)
def test_ickd_equals_the_dense_reference_value_and_gradient(shapes):
    torch.manual_seed(0)
    teacher = [torch.randn(*s) for s in shapes]
    student = [(t + 0.3 * torch.randn_like(t)).requires_grad_() for t in teacher]
    ref, new = _reference_ickd(student, teacher), ickd_loss(student, teacher)
    assert new.item() == pytest.approx(ref.item(), abs=1e-5, rel=1e-5)
    grads = zip(torch.autograd.grad(ref, student), torch.autograd.grad(new, student), strict=True)
    for g_ref, g_new in grads:
        assert torch.allclose(g_new, g_ref, rtol=1e-4, atol=1e-9)
    # near the optimum (student = teacher up to 1e-3) the factored form has no cancellation problem
    close = [(t + 1e-3 * torch.randn_like(t)) for t in teacher]
    assert ickd_loss(close, teacher).item() == pytest.approx(_reference_ickd(close, teacher).item(), abs=1e-6)


def test_correlation_forms_agree_with_zero_channels_and_other_sizes():
    """Dense and factored forms, mixed between student and teacher (maps of other spatial sizes), and
    all-zero channels (F.normalize's eps) give the reference value."""
    torch.manual_seed(2)
    s, t = torch.randn(3, 64, 2, 2), torch.randn(3, 64, 6, 6)
    s[:, 5], t[:, 7] = 0.0, 0.0
    ref = _reference_ickd([s], [t]).item()
    for fs in (False, True):
        for ft in (False, True):
            d = correlation(s, factored=fs).sq_distance(correlation(t, factored=ft)).mean() / 64
            assert d.item() == pytest.approx(ref, rel=1e-5)
    dense = correlation(t, factored=False).dense
    assert torch.allclose(dense, channel_correlation(t))
    fac = correlation(t, factored=True)
    assert torch.allclose((fac.fmap * fac.scale[..., None]) @ fac.fmap.transpose(1, 2), dense, atol=1e-6)


def test_teacher_cache_gives_the_same_losses_and_skips_the_teacher():
    torch.manual_seed(0)
    cfg = _cfg(ickd=True, mse=True, triplet=True)
    student, teacher = build_branches(cfg.model)
    plain = LoQI(student, teacher, cfg.loss).train()
    cached = LoQI(student, teacher, cfg.loss).train()
    cached.teacher_cache = cached.make_teacher_cache()
    # channels_last, as the data pipeline's batches (to_tensor_batch, collated)
    hq = torch.randn(8, 3, 32, 64).contiguous(memory_format=torch.channels_last).view(2, 4, 3, 32, 64)
    hq[1, 1] = hq[0, 1]
    ids = torch.tensor([[0, 10, 11, 12], [1, 10, 13, 14]])  # image 10 twice in the batch
    lq = hq + 0.1 * torch.randn_like(hq)
    calls, forward_features = [], teacher.forward_features
    teacher.forward_features = lambda x: (
        calls.append((len(x), x.is_contiguous(memory_format=torch.channels_last))),
        forward_features(x),
    )[1]
    for step in range(2):
        a, b = plain(hq, lq), cached(hq, lq, ids)
        for k in a:
            assert b[k].item() == pytest.approx(a[k].item(), abs=1e-5, rel=1e-5), (step, k)
    # 7 distinct images computed once; the second step read them all from the cache
    cache = cached.teacher_cache
    assert (len(cache), cache.misses, cache.hits) == (7, 7, 9) and cache.nbytes > 0
    # teacher passes: plain step 1, cached step 1 (7 distinct, still channels_last), plain step 2
    assert calls == [(8, True), (7, True), (8, True)]
    with pytest.raises(ConfigError, match="loss.cache_teacher"):
        _cfg(ickd=False, mse=False, cache_teacher=True)


def test_mse_and_triplet_values():
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    assert mse_loss(s, t).item() == pytest.approx(0.5)  # squared errors 1, 1, 0, 0: mean 2 / 4
    assert mse_loss(s, t, reduction="sum").item() == pytest.approx(1.0)  # per row 2, 0: mean (2 + 0) / 2
    q = torch.tensor([[1.0, 0.0]])
    p = torch.tensor([[0.8, 0.6]])  # d(q, p) = sqrt(0.4)
    n = torch.tensor([[[0.0, 1.0], [-1.0, 0.0]]])  # d = sqrt(2), 2
    dp = math.sqrt(0.4)
    expected = (max(0.0, 0.3 + dp - math.sqrt(2)) + max(0.0, 0.3 + dp - 2.0)) / 2
    assert triplet_loss(q, p, n, margin=0.3).item() == pytest.approx(expected, abs=1e-6)
    assert triplet_loss(q, p, n, margin=1.0).item() == pytest.approx(
        ((1.0 + dp - math.sqrt(2)) + max(0.0, 1.0 + dp - 2.0)) / 2, abs=1e-6
    )
    with pytest.raises(ValueError):
        triplet_loss(q, p, n[0])


# --------------------------------------------------------------------------- the method


def _cfg(**loss):
    return config_from_dict(
        {"data": {"root": "x"}, "model": {"teacher": "random", "input_size": [32, 64]}, "loss": loss}
    )


def test_student_starts_equal_to_teacher_and_teacher_is_frozen():
    torch.manual_seed(0)
    cfg = _cfg()
    student, teacher = build_branches(cfg.model)
    assert student is not teacher
    for (n, a), (_, b) in zip(student.state_dict().items(), teacher.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    method = LoQI(student, teacher, cfg.loss).train()
    assert not teacher.training and student.training
    assert all(not p.requires_grad for p in teacher.parameters())
    x = torch.randn(1, 3, 3, 32, 64)
    with torch.no_grad():  # same input, same BatchNorm statistics: the distillation terms vanish at the start
        out = method.eval()(x, x)
    assert out["ickd"].item() == pytest.approx(0.0, abs=1e-5)
    assert out["mse"].item() == pytest.approx(0.0, abs=1e-5)
    out = method.train()(x, x)
    assert not teacher.training
    out["loss"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


@pytest.mark.parametrize(
    "name, switches",
    [
        ("structvpr_mobilenetv2", (True, False, False)),
        ("structvpr_mobilenetv2", (False, True, False)),
        ("structvpr_mobilenetv2", (False, False, True)),
        ("structvpr_mobilenetv2", (True, True, True)),
        ("gem_mobilenetv2", (True, True, True)),
        ("netvlad_mobilenetv2", (True, True, True)),
    ],
)
def test_every_loss_combination_trains_on_every_model(name, switches):
    torch.manual_seed(0)
    ickd, mse, trip = switches
    cfg = config_from_dict(
        {
            "data": {"root": "x"},
            "model": {"name": name, "teacher": "random"},
            "loss": {"ickd": ickd, "mse": mse, "triplet": trip},
        }
    )
    student, teacher = build_branches(cfg.model)
    method = LoQI(student, teacher, cfg.loss).train()
    hq = torch.randn(2, 3, 3, 32, 32)
    out = method(hq, hq + 0.3 * torch.randn_like(hq))
    assert set(out) == {
        "loss",
        *(k for k, on in zip(("ickd", "mse", "triplet"), switches, strict=True) if on),
    }
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and out["loss"].item() > 0


def test_checkpoint_of_another_model_is_refused(tmp_path):
    other = create_model("gem_mobilenetv2")
    path = save_checkpoint(other, tmp_path / "gem.pt")
    cfg = config_from_dict({"data": {"root": "x"}, "model": {"teacher": str(path)}})
    with pytest.raises(ModelError, match="holds model 'gem_mobilenetv2'.*structvpr_mobilenetv2"):
        build_branches(cfg.model)
    cfg = config_from_dict({"data": {"root": "x"}, "model": {"teacher": "random", "freeze": ["backbone."]}})
    with pytest.raises(ConfigError, match="matches no parameter"):
        build_branches(cfg.model)
