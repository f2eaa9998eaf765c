"""LoQI-VPR's terms in the paper's forms, held against values computed by hand (arithmetic in each test).

L = L_ickd(z^l, z^h) + alpha * L_mse(v^l, v^h) + beta * L_triplet(v^l) (paper 000; the text names the
terms, the defining papers and the authors' code give their forms: docs/training.md).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from vpr_ros.core.errors import ConfigError
from vpr_ros.core.models.registry import Preprocess, VprModel
from vpr_ros.data.places import GroundTruth, ImageRecord, PlaceDataset
from vpr_ros.training.data import Degrader, TupleDataset
from vpr_ros.training.losses import ickd_loss, mse_loss, triplet_loss
from vpr_ros.training.methods.loqi import LoQI, LossConfig, config_from_dict, load_config

ROOT = Path(__file__).resolve().parents[1]


def _unit(d2: float) -> list[float]:
    """The 2-d unit vector at squared distance d2 from (1, 0): d2 = 2 - 2x, so x = 1 - d2 / 2."""
    x = 1.0 - d2 / 2.0
    return [x, math.sqrt(1.0 - x * x)]


# --------------------------------------------------------------------------- triplet (NetVLAD Eq. 7)


def test_weakly_supervised_triplet_is_netvlad_eq7():
    """sum_j max(0, d^2(q, p) + m - d^2(q, n_j)), m = 0.1, mean over the queries of the batch."""
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = torch.tensor([_unit(0.4), [0.0, 1.0]])  # d^2(q1, p1) = 0.4; d^2(q2, p2) = 0
    n = torch.tensor(
        [
            [_unit(0.2), _unit(0.45), _unit(2.0)],  # d^2 = 0.2, 0.45, 2.0
            [[1.0, 0.0], [-1.0, 0.0], [0.0, -1.0]],  # d^2 from (0, 1) = 2, 2, 4
        ]
    )
    # query 1: max(0, 0.4 + 0.1 - 0.2) + max(0, 0.4 + 0.1 - 0.45) + max(0, 0.5 - 2) = 0.3 + 0.05 + 0 = 0.35
    # query 2: 0 + 0.1 - 2 < 0 for every negative: 0;  batch mean (0.35 + 0) / 2 = 0.175
    paper = triplet_loss(q, p, n, 0.1, squared=True, negatives_reduction="sum")
    assert paper.item() == pytest.approx(0.175, abs=1e-6)
    # mean over negatives instead: query 1 0.35 / 3, batch (0.35 / 3 + 0) / 2 = 0.058333
    assert triplet_loss(q, p, n, 0.1, squared=True, negatives_reduction="mean").item() == pytest.approx(
        0.35 / 6, abs=1e-6
    )
    # the earlier form: Euclidean d, m = 0.3, mean over negatives. Query 1: d(q, p) = sqrt(0.4) = 0.632456,
    # d(q, n) = sqrt(0.2) = 0.447214, sqrt(0.45) = 0.670820, sqrt(2) = 1.414214:
    # hinges 0.3 + 0.632456 - 0.447214 = 0.485242, 0.3 + 0.632456 - 0.670820 = 0.261636, 0 -> mean 0.248959;
    # query 2: 0.3 + 0 - sqrt(2) < 0 -> 0; batch mean 0.124480
    old = triplet_loss(q, p, n, 0.3)
    assert old.item() == pytest.approx((0.485242 + 0.261636) / 3 / 2, abs=1e-5)


def test_loqi_objective_uses_the_recipe_triplet_form():
    """LoQI's triplet term with the config defaults equals Eq. 7 on a tuple whose descriptors are given."""
    cfg = LossConfig(ickd=False, mse=False, triplet=True)
    assert (cfg.triplet_distance, cfg.triplet_negatives, cfg.margin) == ("squared", "sum", 0.1)
    model = _Tiny()
    # one tuple: query (1, 0), positive at d^2 0.4, negatives at d^2 0.2 and 0.45 -> 0.3 + 0.05 = 0.35
    descs = torch.tensor([[1.0, 0.0], _unit(0.4), _unit(0.2), _unit(0.45)])
    x = torch.zeros(1, 4, 4, 1, 2)
    x[0, :, 2, 0, :] = descs  # _Tiny's descriptor is channel 2 of its input
    out = LoQI(model, None, cfg)(x, x)
    assert out["triplet"].item() == pytest.approx(0.35, abs=1e-6)
    assert out["loss"].item() == pytest.approx(cfg.beta * 0.35, rel=1e-6)


def test_hard_mining_takes_the_best_positive_and_the_hardest_negatives():
    """NetVLAD's weak supervision: of the potential positives the one nearest the query in descriptor
    space, of the negative candidates the nearest ones."""
    # the query at frame 0; database frames: 1, 2, -1 within 2 (positives 0, 1, 2), 3 within 3 (near, never
    # a negative), 10..13 beyond (negative candidates 4..7)
    frames = [0, 1, 2, -1, 3, 10, 11, 12, 13]
    recs = [ImageRecord(path=Path(f"/x/{i}.png"), name=str(i), frame_index=f) for i, f in enumerate(frames)]
    places = PlaceDataset("hand", recs[1:], recs[:1], GroundTruth("frame", tolerance=2, negatives_beyond=3))
    assert [p.tolist() for p in places.positives()] == [[0, 1, 2]]
    assert [n.tolist() for n in places.near()] == [[0, 1, 2, 3]]
    ds = TupleDataset(
        places, preprocess=Preprocess(input_size=(8, 8)), degrader=Degrader(["none"]), negatives=2, pool=4
    )
    angle = np.deg2rad([50, 10, 30, 0, 80, 20, 60, 40])  # database 0..7; the query at 0 degrees
    db = np.stack([np.cos(angle), np.sin(angle)], 1).astype(np.float32)
    ds.set_cache(np.array([[1.0, 0.0]], np.float32), db)
    qi, pos, negs, _ = ds.tuple_ids(0)
    # positives 0, 1, 2 at 50, 10, 30 degrees: the best match is 1. The pool holds all 4 far candidates
    # 4..7 (80, 20, 60, 40 degrees): the hardest two are 5 (20) and 7 (40).
    assert (qi, pos, negs.tolist()) == (0, 1, [5, 7])


# --------------------------------------------------------------------------- MSE


def test_mse_is_the_per_element_mean():
    s = torch.tensor([[0.6, 0.8, 0.0], [1.0, 0.0, 0.0]])
    t = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    # squared errors: row 1 0.36, 0.04, 0 (sum 0.4); row 2 1, 0, 1 (sum 2); 6 elements: (0.4 + 2) / 6 = 0.4
    assert mse_loss(s, t).item() == pytest.approx(0.4, abs=1e-6)
    # the summed form: per row 0.4 and 2, mean over the batch 1.2 = 3 (D) x 0.4
    assert mse_loss(s, t, reduction="sum").item() == pytest.approx(1.2, abs=1e-6)


# --------------------------------------------------------------------------- ICKD on the latent code z


class _Tiny(VprModel):
    """forward_features: [channels 0-1, channels 2-3] of a (N, 4, 1, 2) input (the last is z); the
    descriptor: channel 2 (N, 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))
        self.descriptor_dim = 2

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.w * x[:, 0:2], self.w * x[:, 2:4]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w * x[:, 2, 0, :]


def _ickd_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """Tuples (1, 3, 4, 1, 2): both maps 2 channels x 2 positions. Student z F_s = [[1, 0], [0, 1]],
    teacher z F_t = [[1, 1], [0, 1]]; the first map is equal for both ([[1, 2], [3, 4]])."""
    first = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    s = torch.cat([first, torch.tensor([[1.0, 0.0], [0.0, 1.0]])]).view(4, 1, 2)
    t = torch.cat([first, torch.tensor([[1.0, 1.0], [0.0, 1.0]])]).view(4, 1, 2)
    return t.expand(1, 3, 4, 1, 2).clone(), s.expand(1, 3, 4, 1, 2).clone()


# G_s = F_s F_s^T = I, rows already unit. G_t = [[2, 1], [1, 1]], row norms sqrt(5) and sqrt(2):
# G^_t = [[2/sqrt5, 1/sqrt5], [1/sqrt2, 1/sqrt2]] = [[0.894427, 0.447214], [0.707107, 0.707107]].
# ||G^_s - G^_t||^2 = (1 - 0.894427)^2 + 0.447214^2 + 0.707107^2 + (1 - 0.707107)^2
#                   = 0.011146 + 0.2 + 0.5 + 0.085786 = 0.796932;  / C (= 2) = 0.398466
ICKD_Z = 0.398466


def test_ickd_distils_the_latent_code_z_only():
    hq, lq = _ickd_inputs()
    method = LoQI(_Tiny(), _Tiny(), LossConfig(ickd=True, mse=False, triplet=False))
    assert method(hq, lq)["ickd"].item() == pytest.approx(ICKD_Z, abs=1e-5)
    assert ickd_loss([lq[0, :, 2:4]], [hq[0, :, 2:4]]).item() == pytest.approx(ICKD_Z, abs=1e-5)
    # the earlier option, every map: the first maps are equal (0), mean over the 2 maps 0.398466 / 2
    every = LoQI(_Tiny(), _Tiny(), LossConfig(ickd=True, mse=False, triplet=False, ickd_maps=[0, 1]))
    assert every(hq, lq)["ickd"].item() == pytest.approx(ICKD_Z / 2, abs=1e-5)


def test_total_is_the_weighted_sum_with_the_recipe_weights():
    """L = ickd_weight * L_ickd + alpha * L_mse + beta * L_triplet on one tuple whose terms are known."""
    hq, lq = _ickd_inputs()
    cfg = LossConfig(ickd=True, mse=True, triplet=True, alpha=1000.0, beta=5.0)
    out = LoQI(_Tiny(), _Tiny(), cfg)(hq, lq)
    # descriptors (channel 2): student (1, 0) for all 3 images, teacher (1, 1): squared errors 0 and 1 per
    # image -> MSE = 3 / 6 = 0.5. Triplet: q = p = n = (1, 0): per negative max(0, 0 + 0.1 - 0) = 0.1, one
    # negative -> 0.1. Total: 0.398466 + 1000 * 0.5 + 5 * 0.1 = 500.898466
    assert out["mse"].item() == pytest.approx(0.5, abs=1e-6)
    assert out["triplet"].item() == pytest.approx(0.1, abs=1e-6)
    assert out["loss"].item() == pytest.approx(ICKD_Z + 500.0 + 0.5, abs=1e-3)


def test_recipe_and_defaults_are_the_paper_forms():
    cfg = load_config(ROOT / "training/loqi_nordland_jpeg10.yaml", ["data.root=/x"])
    lo = cfg.loss
    assert cfg.data.mining == "hard"
    assert (lo.ickd_maps, lo.mse_reduction, lo.triplet_distance, lo.triplet_negatives, lo.margin) == (
        None,
        "mean",
        "squared",
        "sum",
        0.1,
    )
    assert (lo.alpha, lo.beta) == (LossConfig().alpha, LossConfig().beta)
    with pytest.raises(ConfigError, match="loss.triplet_distance"):
        config_from_dict(
            {"data": {"root": "x"}, "model": {"teacher": "random"}, "loss": {"triplet_distance": "cosine"}}
        )
