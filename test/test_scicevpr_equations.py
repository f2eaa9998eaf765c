"""SciceVPR (paper 003) as the paper and its authors' code define it, against values computed by hand:
14 regional features by multi-level GeM, the self-enhanced encoder on every regional feature alone, and the
DINOv2 weights as a one-line recipe change (official dinov2_vits14 key names and shapes)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vpr_ros.core.models import create_model
from vpr_ros.core.models.scicevpr import SciceStudent
from vpr_ros.training.methods.scicevpr import METHOD, build_models

SMALL = {"arch": "vits14", "image_size": [56, 56]}


@pytest.fixture(scope="module")
def student() -> SciceStudent:
    torch.manual_seed(0)
    return create_model("scicevpr_dinov2", **SMALL).eval()


def test_defaults_follow_the_authors_code(student):
    assert student.global_token == "gem"  # GeM of the whole map, not the class token
    assert len(student.encoder.layers) == 1  # SciceVPR: nn.TransformerEncoder(num_layers=1)
    assert len(create_model("cricavpr_teacher_dinov2", **SMALL).encoder.layers) == 2  # Super-CricaVPR: 2
    assert len(student.mixer) == 2  # the README's training commands: --token_num 2


def test_fourteen_regions_by_multi_level_gem_by_hand(student):
    """C = 2 channels on a 4x4 map: channel 0 is 1 everywhere, channel 1 is 2 on the 4 cells of rows 0-1,
    cols 0-1 and 0 elsewhere."""
    fmap = torch.zeros(1, 2, 4, 4)
    fmap[:, 0] = 1.0
    fmap[:, 1, 0:2, 0:2] = 2.0
    with torch.no_grad():
        r = student.regions(fmap, torch.zeros(1, 2))[0]
    # GeM with p = 3: (mean x^3)^(1/3); 0 is clamped to eps = 1e-6 (eps^3 = 1e-18: negligible here).
    # whole map: channel 0: 1; channel 1: (4 * 8 / 16)^(1/3) = 2^(1/3) = 1.259921
    #   L2-normalised: norm sqrt(1 + 1.587401) = 1.608540 -> (0.621683, 0.783267)
    assert r[0].tolist() == pytest.approx([0.621683, 0.783267], abs=1e-5)
    # 2x2 region 0 (rows 0:2, cols 0:2): (1, 2) / sqrt(5) = (0.447214, 0.894427); region 1 (cols 2:4): (1, ~0)
    assert r[1].tolist() == pytest.approx([0.447214, 0.894427], abs=1e-5)
    assert r[2].tolist() == pytest.approx([1.0, 0.0], abs=1e-5)
    # 3x3 on 4 cells (edges 0, 1, 3, 4): region (0, 0) = cell (0, 0): (1, 2) -> (0.447214, 0.894427);
    # centre region rows 1:3, cols 1:3 holds one 2 of 4 cells: (8 / 4)^(1/3) = 2^(1/3) as the whole map
    assert r[5].tolist() == pytest.approx([0.447214, 0.894427], abs=1e-5)
    assert r[9].tolist() == pytest.approx([0.621683, 0.783267], abs=1e-5)
    assert r[13].tolist() == pytest.approx([1.0, 0.0], abs=1e-5)  # bottom-right cell
    assert math.isclose(float(r.norm(dim=1).min()), 1.0, abs_tol=1e-6)


def test_self_enhanced_encoder_encodes_every_region_alone(student):
    """A post-norm transformer layer on a sequence of one token: softmax over one key is 1, so attention
    is W_o (W_v x + b_v) + b_o; then y = LN1(x + attn), out = LN2(y + W_2 GELU(W_1 y + b_1) + b_2)."""
    torch.manual_seed(3)
    r = torch.randn(3, 14, 384)
    with torch.no_grad():
        out = student.encode(r)
        layer = student.encoder.layers[0]
        c = 384
        w_v, b_v = layer.self_attn.in_proj_weight[2 * c :], layer.self_attn.in_proj_bias[2 * c :]
        attn = F.linear(F.linear(r, w_v, b_v), layer.self_attn.out_proj.weight, layer.self_attn.out_proj.bias)
        y = layer.norm1(r + attn)
        ffn = layer.linear2(F.gelu(layer.linear1(y)))
        want = layer.norm2(y + ffn)
    assert torch.allclose(out, want, atol=1e-4)
    # not mixed across regions nor images: changing one regional feature changes only its own output
    bumped = r.clone()
    bumped[1, 5] += 1.0
    with torch.no_grad():
        changed = (student.encode(bumped) - out).abs().amax(dim=2)
    assert changed[1, 5] > 1e-3 and changed.sum() == changed[1, 5]


def _official_dinov2_vits14() -> dict[str, torch.Tensor]:
    """A state dict with the official dinov2_vits14 names and shapes (facebookresearch/dinov2 hubconf:
    vit_small, patch 14, img_size 518, init_values 1.0, ffn "mlp", block_chunks 0): D = 384, 12 blocks,
    MLP 4 D = 1536, a 518 / 14 = 37 x 37 grid + the class token = 1370 positions."""
    d, g = 384, torch.Generator().manual_seed(7)

    def t(*shape):
        return torch.randn(*shape, generator=g) * 0.02

    sd = {"cls_token": t(1, 1, d), "pos_embed": t(1, 37 * 37 + 1, d), "mask_token": t(1, d),
          "patch_embed.proj.weight": t(d, 3, 14, 14), "patch_embed.proj.bias": t(d)}
    for i in range(12):
        b = f"blocks.{i}."
        sd.update({b + "norm1.weight": 1 + t(d), b + "norm1.bias": t(d),
                   b + "attn.qkv.weight": t(3 * d, d), b + "attn.qkv.bias": t(3 * d),
                   b + "attn.proj.weight": t(d, d), b + "attn.proj.bias": t(d), b + "ls1.gamma": 1 + t(d),
                   b + "norm2.weight": 1 + t(d), b + "norm2.bias": t(d),
                   b + "mlp.fc1.weight": t(4 * d, d), b + "mlp.fc1.bias": t(4 * d),
                   b + "mlp.fc2.weight": t(d, 4 * d), b + "mlp.fc2.bias": t(d), b + "ls2.gamma": 1 + t(d)})
    sd.update({"norm.weight": 1 + t(d), "norm.bias": t(d)})
    return sd


def test_dinov2_weights_are_one_recipe_line(tmp_path, student):
    official = _official_dinov2_vits14()
    # the model expects exactly these tensors (the official mask_token is for DINOv2's own training)
    expected = {k: tuple(v.shape) for k, v in student.backbone.state_dict().items()}
    assert expected == {k: tuple(v.shape) for k, v in official.items() if k != "mask_token"}
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(official, path)
    recipe = {
        "stage": "teacher",
        "data": {"root": "x"},
        "model": {"name": "cricavpr_teacher_dinov2", "config": SMALL, "weights": str(path)},
    }
    model, _ = build_models(METHOD.config(recipe))
    got = model.backbone.state_dict()
    for k in ("pos_embed", "blocks.11.attn.qkv.weight", "blocks.3.ls2.gamma", "norm.bias"):
        assert torch.equal(got[k], official[k]), k
    # without the line the backbone is random, and so differs
    random_model, _ = build_models(METHOD.config({**recipe, "model": {**recipe["model"], "weights": ""}}))
    assert not torch.equal(random_model.backbone.state_dict()["norm.bias"], official["norm.bias"])
