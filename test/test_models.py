"""Model registry, the StructVPR student, self-describing checkpoints and device choice."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
import torch

from vpr_ros.core.errors import ModelError
from vpr_ros.core.models import (
    Preprocess,
    create_model,
    list_models,
    load_model,
    parse_size,
    read_checkpoint,
    resolve_model,
    save_checkpoint,
    select_device,
)
from vpr_ros.core.models.backbones import mobilenet_v2_features


def test_registry_lists_models_and_rejects_unknown_names():
    names = list_models()
    assert {"structvpr_mobilenetv2", "gem_mobilenetv2", "netvlad_mobilenetv2"} <= set(names)
    with pytest.raises(ModelError, match="unknown model 'nope'.*structvpr_mobilenetv2"):
        create_model("nope")
    with pytest.raises(ModelError, match="no config keys"):
        create_model("gem_mobilenetv2", colour="red")


@pytest.mark.parametrize(("name", "cfg", "dim"), [
    ("structvpr_mobilenetv2", {}, 448),
    ("gem_mobilenetv2", {}, 320),
    ("gem_mobilenetv2", {"dim": 128}, 128),
    ("netvlad_mobilenetv2", {"clusters": 8}, 8 * 320),
])
def test_descriptors_have_declared_dim_and_unit_norm(name, cfg, dim):
    torch.manual_seed(0)
    model = create_model(name, **cfg).eval()
    with torch.no_grad():
        d = model(torch.randn(3, 3, 64, 96))
    assert model.descriptor_dim == dim
    assert d.shape == (3, dim)
    assert torch.allclose(d.norm(dim=1), torch.ones(3), atol=1e-5)


def test_structvpr_stage_maps_are_the_papers_32_96_320_channels():
    model = create_model("structvpr_mobilenetv2").eval()
    with torch.no_grad():
        maps = model.forward_features(torch.randn(1, 3, 128, 256))
    assert [m.shape[1] for m in maps] == [32, 96, 320]
    assert [m.shape[2:] for m in maps] == [(16, 32), (8, 16), (4, 8)]  # strides 8, 16, 32
    # The descriptor is the normalised concat of per-level normalised global max pools.
    x = torch.randn(2, 3, 128, 256)
    with torch.no_grad():
        parts = [torch.nn.functional.normalize(m.amax(dim=(2, 3)), dim=1) for m in model.forward_features(x)]
        expected = torch.nn.functional.normalize(torch.cat(parts, 1), dim=1)
        assert torch.allclose(model(x), expected, atol=1e-6)


def test_imagenet_weights_load_offline_through_torchvision(torch_home):
    trunk = mobilenet_v2_features(pretrained=True)
    from torchvision.models import MobileNet_V2_Weights, mobilenet_v2

    ref = mobilenet_v2(weights=MobileNet_V2_Weights.IMAGENET1K_V1).features
    assert torch.equal(trunk[0][0].weight, ref[0][0].weight)
    # Not the random init: ImageNet first-layer filters have a known, non-trivial scale.
    fresh = mobilenet_v2_features(pretrained=False)
    assert not torch.equal(trunk[0][0].weight, fresh[0][0].weight)


def test_missing_imagenet_weights_give_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    # No network here and no seeded file: torchvision's download must fail, and we say why.
    import torch.hub

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url",
                        lambda *a, **k: (_ for _ in ()).throw(OSError("network is unreachable")))
    with pytest.raises(ModelError, match="ImageNet MobileNetV2 weights.*TORCH_HOME"):
        mobilenet_v2_features(pretrained=True)


def test_checkpoint_round_trip_is_self_describing(tmp_path):
    torch.manual_seed(1)
    model = create_model("gem_mobilenetv2", dim=64, preprocess=Preprocess(input_size=(96, 128))).eval()
    path = save_checkpoint(model, tmp_path / "m.pt", meta={"note": "test"})
    ckpt = read_checkpoint(path)
    assert ckpt["model"] == {"name": "gem_mobilenetv2", "config": {"p": 3.0, "dim": 64},
                             "descriptor_dim": 64,
                             "preprocess": {"input_size": [96, 128], "mean": list(model.preprocess.mean),
                                            "std": list(model.preprocess.std)}}
    assert ckpt["meta"]["note"] == "test" and ckpt["kind"] == "deployed"
    loaded = load_model(path)
    assert loaded.preprocess.input_size == (96, 128)
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        assert torch.allclose(model(x), loaded(x))
    assert not list(tmp_path.glob(".*tmp"))  # the atomic write left no temp file


def test_checkpoints_load_with_weights_only_and_refuse_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    bad = tmp_path / "evil.pt"
    torch.save({"format": "vpr_ros.checkpoint", "payload": Evil()}, bad)
    with pytest.raises(ModelError, match="not a readable vpr_ros checkpoint"):
        read_checkpoint(bad)


def test_bad_checkpoint_files_give_clear_errors(tmp_path):
    model = create_model("structvpr_mobilenetv2")
    good = save_checkpoint(model, tmp_path / "good.pt")
    truncated = tmp_path / "trunc.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ModelError, match="not a readable"):
        read_checkpoint(truncated)
    with pytest.raises(ModelError, match="not found"):
        read_checkpoint(tmp_path / "missing.pt")
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(ModelError, match="not a vpr_ros checkpoint"):
        read_checkpoint(other)
    with pytest.raises(ModelError, match="holds model 'structvpr_mobilenetv2', expected 'gem_mobilenetv2'"):
        load_model(good, expected_name="gem_mobilenetv2")
    # Weights of another shape under a valid description: strict loading names the model.
    ckpt = read_checkpoint(good)
    ckpt["model"]["name"] = "gem_mobilenetv2"
    ckpt["model"]["config"] = {"p": 3.0, "dim": 0}
    ckpt["model"]["descriptor_dim"] = 320
    wrong = tmp_path / "wrong.pt"
    torch.save(ckpt, wrong)
    with pytest.raises(ModelError, match="do not fit model 'gem_mobilenetv2'"):
        load_model(wrong)
    assert zipfile.is_zipfile(good)


def test_resolve_model_and_sizes(tmp_path):
    m = resolve_model(model="gem_mobilenetv2", pretrained=False, input_size=None)
    assert m.name == "gem_mobilenetv2" and m.preprocess.input_size is None and not m.training
    path = save_checkpoint(m, tmp_path / "g.pt")
    assert resolve_model(path, input_size=(64, 64)).preprocess.input_size == (64, 64)
    assert parse_size("240x320") == (240, 320) and parse_size("native") is None
    for bad in ("240", "axb", "8x8"):
        with pytest.raises(ModelError):
            parse_size(bad)


def test_device_selection():
    assert select_device("cpu").type == "cpu"
    assert select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ModelError, match="unknown device"):
        select_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="CUDA is not available"):
            select_device("cuda")


def test_preprocess_validation():
    assert Preprocess.from_dict({"input_size": [32, 64]}).input_size == (32, 64)
    with pytest.raises(ModelError, match="unknown preprocessing keys"):
        Preprocess.from_dict({"size": [1, 2]})
    with pytest.raises(ModelError, match="input_size"):
        Preprocess.from_dict({"input_size": [8, 8]})
    assert np.allclose(Preprocess().mean, (0.485, 0.456, 0.406))



def test_builder_chosen_preprocessing_survives_create_model():
    # SciceVPR sets its input size from its image_size config; the spec default must not undo that.
    model = create_model("scicevpr_dinov2", arch="vits14", image_size=[112, 112])
    assert model.preprocess.input_size == (112, 112)
    assert create_model("structvpr_mobilenetv2").preprocess.input_size == (240, 320)  # spec default
    explicit = create_model("scicevpr_dinov2", arch="vits14", image_size=[112, 112],
                            preprocess=Preprocess(input_size=(56, 56)))
    assert explicit.preprocess.input_size == (56, 56)
