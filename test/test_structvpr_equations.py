"""StructVPR's equations held against values computed by hand from the paper (Shen et al., CVPR 2023,
shared/papers/001_*.txt): the ranks x, y and groups D1-D4 (Sec. 3.4), the weights phi (Eq. 4) and phi'
(Eq. 7), the GP-S / GP-R partitions (Sec. 4.4) and the distillation loss (Eq. 5-6).

Natural logs used below: ln 2 = 0.693147, ln 3 = 1.098612, ln 4 = 1.386294, ln 5 = 1.609438, ln 6 = 1.791759,
ln 11 = 2.397895.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vpr_ros.training.methods.structvpr.partition import Pairs, keep_mask, positive_ranks, rank_pairs
from vpr_ros.training.methods.structvpr.weighted_kd import (
    StructVPRDistill,
    WeightingConfig,
    pair_weights,
    phi,
    phi_prime,
    triplet_eq3,
    weighted_kd_loss,
)

# --------------------------------------------------------------------------- ranks (Sec. 3.4)


def test_rank_is_the_positions_in_the_recall_list_of_all_database_images():
    """ "the ranking of the positive p in the recall list of the query q": every database image that
    scores above p counts, other positives of q included; the images excluded for q never do."""
    db = np.eye(6, dtype=np.float32)
    q = np.array([[0.1, 0.9, 0.5, 0.8, 0.7, 0.3]], dtype=np.float32)  # similarity to db image i = q[i]
    # positives 2 (0.5) and 4 (0.7); db 1 (0.9) is excluded (the query's own neighbouring frame)
    qi, p, r = positive_ranks(q, db, [np.array([2, 4])], [np.array([1])])
    assert qi.tolist() == [0, 0] and p.tolist() == [2, 4]
    # p = 2: above it db 3 (0.8) and db 4 (0.7, a positive) -> rank 1 + 2 = 3
    # p = 4: above it db 3 (0.8) -> rank 1 + 1 = 2
    assert r.tolist() == [3, 2]
    # the option wrong-only: p = 2 has only db 3 above it that is not a positive -> 1 + 1 = 2
    _, _, r_wrong = positive_ranks(q, db, [np.array([2, 4])], [np.array([1])], rank="wrong-only")
    assert r_wrong.tolist() == [2, 2]
    # nothing excluded: p = 2 has 0.9, 0.8, 0.7 above it -> 1 + 3 = 4
    assert positive_ranks(q, db, [np.array([2])], None)[2].tolist() == [4]
    with pytest.raises(ValueError, match="unknown rank"):
        positive_ranks(q, db, [np.array([2])], None, rank="top")


def test_rank_pairs_default_is_the_list_rank_for_both_branches():
    db = np.eye(6, dtype=np.float32)
    seg_q = np.array([[0.1, 0.9, 0.5, 0.8, 0.7, 0.3]], dtype=np.float32)
    rgb_q = seg_q[:, ::-1].copy()  # [0.3, 0.7, 0.8, 0.5, 0.9, 0.1]
    pairs = rank_pairs((seg_q, db), (rgb_q, db), [np.array([2, 4])])
    # seg: p = 2 (0.5) below 0.9, 0.8, 0.7 -> x = 4; p = 4 (0.7) below 0.9, 0.8 -> x = 3
    # rgb: p = 2 (0.8) below 0.9 (db 4, the other positive) -> y = 2; p = 4 (0.9) first -> y = 1
    assert pairs.x.tolist() == [4, 3] and pairs.y.tolist() == [2, 1]
    old = rank_pairs((seg_q, db), (rgb_q, db), [np.array([2, 4])], rank="wrong-only")
    # wrong-only: seg p = 2 below 0.9, 0.8 (not 0.7, a positive) -> 3; rgb p = 2 -> 1 (0.9 is a positive)
    assert old.x.tolist() == [3, 3] and old.y.tolist() == [1, 1]


# --------------------------------------------------------------------------- partitions (Sec. 4.4)


def test_gp_s_keeps_s1_and_gp_r_keeps_r1():
    x = np.array([1, 10, 11, 5, 3])
    y = np.array([1, 20, 2, 4, 30])
    # GP-S keeps S1 = x <= 10:          1, 10 yes; 11 no; 5, 3 yes
    assert keep_mask(x, y, "gp-s").tolist() == [True, True, False, True, True]
    # GP-R keeps R1 = y <= 10:          1 yes; 20 no; 2, 4 yes; 30 no
    assert keep_mask(x, y, "gp-r").tolist() == [True, False, True, True, False]
    # GP-D keeps D1-D3 = everything but D4 (x > 10): only the third pair goes
    assert keep_mask(x, y, "gp-d").tolist() == [True, True, False, True, True]


# --------------------------------------------------------------------------- phi, Eq. 4


@pytest.mark.parametrize(
    "x, y, expected",
    [
        # D2 (x <= y <= N_t): 1 + (y - x) / (5 ln(1 + x))
        (1, 3, 1.577078),  # 1 + (3 - 1) / (5 * ln 2) = 1 + 2 / 3.465736 = 1 + 0.577078
        (1, 1, 1.0),  # 1 + 0 / (5 * ln 2)
        (4, 9, 1.621335),  # 1 + (9 - 4) / (5 * ln 5) = 1 + 5 / 8.047190 = 1 + 0.621335
        # D1 (x <= N_t < y): 1 + (min(N_m, y) - x) / (4 ln(1 + x))
        (1, 30, 7.852801),  # 1 + (min(20, 30) - 1) / (4 * ln 2) = 1 + 19 / 2.772589 = 1 + 6.852801
        (3, 15, 3.164043),  # 1 + (15 - 3) / (4 * ln 4) = 1 + 12 / 5.545177 = 1 + 2.164043
        (10, 11, 1.104258),  # 1 + (11 - 10) / (4 * ln 11) = 1 + 1 / 9.591581 = 1 + 0.104258
        # D3 (y < x <= N_t): 1 + (y - x) / (4 ln(1 + x))
        (5, 2, 0.581417),  # 1 + (2 - 5) / (4 * ln 6) = 1 - 3 / 7.167038 = 1 - 0.418583
        (10, 1, 0.061677),  # 1 + (1 - 10) / (4 * ln 11) = 1 - 9 / 9.591581 = 1 - 0.938323
        # D4 (x > N_t): 0
        (11, 1, 0.0),
        (11, 50, 0.0),
    ],
)
def test_phi_eq4_hand_computed(x, y, expected):
    assert float(phi(x, y, n_t=10, n_m=20)) == pytest.approx(expected, abs=1e-6)


def test_phi_rejects_ranks_below_one():
    # rank 0 would put ln(1 + 0) = 0 in the denominator; ranks count from 1
    with pytest.raises(ValueError, match="count from 1"):
        phi(0, 3)


def test_phi_prime_eq7_hand_computed():
    # S1 (x <= N_t): 1 + 1 / (4 ln(1 + x)); S2: 0
    # x = 1: 1 + 1 / (4 * ln 2) = 1 + 1 / 2.772589 = 1.360674
    # x = 10: 1 + 1 / (4 * ln 11) = 1 + 1 / 9.591581 = 1.104258
    assert phi_prime(np.array([1, 10, 11]), n_t=10).tolist() == pytest.approx(
        [1.360674, 1.104258, 0.0], abs=1e-6
    )


def test_pair_weights_of_the_ablation_rows():
    # one pair per group: D1 (2, 40), D2 (1, 1), D3 (4, 3), D4 (12, 1)
    pairs = Pairs(
        np.array([0, 0, 1, 2]), np.array([5, 6, 7, 8]), x=np.array([2, 1, 4, 12]), y=np.array([40, 1, 3, 1])
    )
    # GP-D phi: D1 1 + (20 - 2) / (4 ln 3) = 1 + 18 / 4.394449 = 5.096077; D2 1 + 0 = 1;
    #           D3 1 + (3 - 4) / (4 ln 5) = 1 - 1 / 6.437752 = 0.844666; D4 0
    assert pair_weights(pairs, WeightingConfig("gp-d", "phi")).tolist() == pytest.approx(
        [5.096077, 1.0, 0.844666, 0.0], abs=1e-6
    )
    # GP-D constant 8-4-1-0
    assert pair_weights(pairs, WeightingConfig("gp-d", "constant")).tolist() == [8.0, 4.0, 1.0, 0.0]
    # GP-S phi' (S1 = x <= 10): x = 2: 1 + 1 / (4 ln 3) = 1 + 1 / 4.394449 = 1.227560; x = 1: 1.360674;
    #           x = 4: 1 + 1 / (4 ln 5) = 1 + 1 / 6.437752 = 1.155334; x = 12: 0
    assert pair_weights(pairs, WeightingConfig("gp-s", "phi-prime")).tolist() == pytest.approx(
        [1.227560, 1.360674, 1.155334, 0.0], abs=1e-6
    )
    # GP-S (S1, weight 1): x <= 10 -> 1, 1, 1, 0; GP-R (R1 = y <= 10): y = 40 no, 1, 3, 1 yes
    assert pair_weights(pairs, WeightingConfig("gp-s", "ones")).tolist() == [1.0, 1.0, 1.0, 0.0]
    assert pair_weights(pairs, WeightingConfig("gp-r", "ones")).tolist() == [0.0, 1.0, 1.0, 1.0]
    assert pair_weights(pairs, WeightingConfig("all", "ones")).tolist() == [1.0, 1.0, 1.0, 1.0]


# ------------------------------------------------- L_kd and the Stage II loss, Eq. 3, 5, 6


def test_triplet_eq3_hand_computed():
    q, p = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    n = torch.tensor([[[1.0, 0.0], [-1.0, 0.0]]])  # two negatives
    # d(q, p) = sqrt(1 + 1) = 1.414214; d(q, n1) = 0; d(q, n2) = 2
    # n1: max(1.414214 - 0 + 0.1, 0) = 1.514214; n2: max(1.414214 - 2 + 0.1, 0) = max(-0.485786, 0) = 0
    assert triplet_eq3(q, p, n, 0.1)[0].tolist() == pytest.approx([1.514214, 0.0], abs=1e-6)


def test_weighted_kd_loss_sums_over_q_p_n():
    # T(x^D) of q, p, n (already mapped into the seg-branch's space) and the seg-branch's x^S
    t_xd = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]])
    x_s = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]])
    # ||.||^2: q (0, 0, 0) -> 0; p (0, -1, 1) -> 2; n (-1, 1, 0) -> 2
    # phi = 1.5: 1.5 * (0 + 2 + 2) = 6.0 (a sum over {q, p, n}, not a mean)
    assert float(weighted_kd_loss(x_s, t_xd, torch.tensor([1.5]))) == pytest.approx(6.0)
    # two negatives (two triplets): n2 equal to its target -> 0; Eq. 6 per triplet: 1.5 * (0 + 2 + 2) = 6
    # and 1.5 * (0 + 2 + 0) = 3, mean over the tuple's triplets (6 + 3) / 2 = 4.5
    t2 = torch.cat([t_xd, torch.tensor([[[0.0, 0.0, 1.0]]])], 1)
    s2 = torch.cat([x_s, torch.tensor([[[0.0, 0.0, 1.0]]])], 1)
    assert float(weighted_kd_loss(s2, t2, torch.tensor([1.5]))) == pytest.approx(4.5)
    # batch of the two tuples with phi 1.5 and 0 (D4): (6.0 + 0) / 2 = 3.0
    both = torch.cat([x_s, x_s]), torch.cat([t_xd, t_xd])
    assert float(weighted_kd_loss(*both, torch.tensor([1.5, 0.0]))) == pytest.approx(3.0)
    with pytest.raises(ValueError):
        weighted_kd_loss(x_s, t_xd, torch.ones(2))


def test_stage2_T_maps_the_student_into_the_seg_branch_space():
    """T embeds the student's x^D (448) in the seg-branch's space (480); the loss is Eq. 6:
    L_vpr(x^D) + phi * sum_I ||x^S_I - T(x^D_I)||^2, with T and the student trained, the seg-branch not."""
    from vpr_ros.core.models import create_model
    from vpr_ros.training.methods.structvpr.seg_branch import SegBranch

    torch.manual_seed(0)
    student, seg = create_model("structvpr_mobilenetv2"), SegBranch()
    kd = StructVPRDistill(student, seg, kd_weight=1.0, margin=0.1)
    assert (kd.proj.in_features, kd.proj.out_features) == (448, 480)
    kd.eval()  # BatchNorm on running statistics: the recomputation below sees the same descriptors
    rgb, slme, w = torch.rand(2, 3, 3, 64, 64), torch.rand(2, 3, 6, 64, 64), torch.tensor([1.5, 0.0])
    out = kd(rgb, slme, w)
    with torch.no_grad():
        x_d = student(rgb.flatten(0, 1)).view(2, 3, -1)
        x_s = seg(slme.flatten(0, 1)).view(2, 3, -1)
        sq = ((x_s - kd.proj(x_d)) ** 2).sum(-1)  # (2 tuples, q p n)
        expected_kd = (1.5 * sq[0].sum() + 0.0 * sq[1].sum()) / 2  # phi-weighted sums, batch mean
    assert out["kd"].item() == pytest.approx(float(expected_kd), rel=1e-4)
    assert out["loss"].item() == pytest.approx((out["triplet"] + out["kd"]).item(), rel=1e-6)
