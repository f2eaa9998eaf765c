"""The accuracy study (vpr_ros.studies.accuracy, scripts/accuracy_study.py): formula, tables, --quick."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

from vpr_ros.eval.metrics import EvalResult
from vpr_ros.studies import accuracy as study

REPO = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("accuracy_study", REPO / "scripts" / "accuracy_study.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# --------------------------------------------------------------------------- the gap formula


def test_gap_share_formula():
    # finetuned: 20 % at full quality, 10 % over the link; distilled 15 % over the link: half the gap
    assert study.gap_share(0.20, 0.10, 0.15) == pytest.approx(0.5)
    assert study.gap_share(0.20, 0.10, 0.20) == pytest.approx(1.0)
    assert study.gap_share(0.20, 0.10, 0.10) == pytest.approx(0.0)
    assert study.gap_share(0.20, 0.10, 0.05) == pytest.approx(-0.5)  # worse than fine-tuning
    assert study.gap_share(0.20, 0.10, 0.25) == pytest.approx(1.5)  # beyond the HQ recall
    # a gap under 2 points (or a link that helps the fine-tuned model) gives no share
    assert study.gap_share(0.20, 0.19, 0.25) is None
    assert study.gap_share(0.10, 0.20, 0.25) is None
    assert study.gap_share(0.20, 0.15, 0.17, min_gap=0.05) == pytest.approx(0.4)


def test_gap_table_rows_and_bootstrap_interval():
    n = 200
    rng = np.random.default_rng(1)
    # per-query rank of the first hit (0 = right at R@1, -1 = missed)
    hq = np.where(rng.random(n) < 0.4, 0, -1)
    lq = np.where(rng.random(n) < 0.2, 0, -1)
    dist = np.where(rng.random(n) < 0.3, 0, -1)

    def res(link, model, first):
        return EvalResult("ds", model, link, {1: float((first == 0).mean()), 5: 0.9, 10: 1.0}, n_queries=n)

    results = [res("none", "finetuned", hq), res("jpeg_q10", "finetuned", lq), res("jpeg_q10", "loqi", dist),
               res("none", "loqi", hq)]
    hits = {("ds", "none", "finetuned"): hq, ("ds", "jpeg_q10", "finetuned"): lq,
            ("ds", "jpeg_q10", "loqi"): dist}
    rows = study.gap_table(results, hits, {"ds": np.ones(n, bool)})
    assert len(rows) == 1
    row = rows[0]
    expect = ((dist == 0).mean() - (lq == 0).mean()) / ((hq == 0).mean() - (lq == 0).mean())
    assert row["share"] == pytest.approx(expect)
    lo, hi = row["ci90"]
    assert lo < row["share"] < hi and hi - lo > 0.1  # 200 queries: a wide interval, around the estimate


def test_operating_points_pick_the_cheapest_link_within_90_percent():
    rs = [EvalResult("d", "m", "none", {1: 0.50}, bytes_per_frame=6000.0),
          EvalResult("d", "m", "jpeg_q10", {1: 0.46}, bytes_per_frame=700.0),
          EvalResult("d", "m", "h264_qp40", {1: 0.44}, bytes_per_frame=90.0),
          EvalResult("d", "m", "h264_qp50", {1: 0.20}, bytes_per_frame=40.0)]
    (op,) = study.operating_points(rs)
    assert op["link"] == "jpeg_q10" and op["bytes"] == 700.0  # 0.44 < 0.9 * 0.50


def test_missing_scicevpr_weights_are_reported_not_faked():
    models = study.build_models(study.StudyConfig(models=("scicevpr", "finetuned")))
    if study.SCICEVPR_WEIGHTS.is_file():
        pytest.skip("SciceVPR weights are packaged here")
    sc, ft = models
    assert not sc.available and "no weights" in sc.reason and "DINOv2" in sc.reason
    assert not ft.available  # no checkpoint given


# --------------------------------------------------------------------------- datasets


def test_study_sets_hold_out_training_places_and_have_ground_truth(shared_dir):
    cfg = study.StudyConfig(shared=shared_dir, datasets=("nordland", "kitti05", "rtabmap_loop"))
    nord, kitti, rtab = study.load_sets(cfg)
    split = study.held_out_split()
    assert split is not None
    assert [s.name for s in (nord, kitti, rtab)] == ["nordland", "kitti05", "rtabmap_loop"]
    assert len(study.stream(nord)) == 700 and len(nord.database) == 700  # the LoQI study's validation places
    assert all(study.is_held_out(r.frame_index, split) for r in nord.database + nord.queries)
    assert study.domains(kitti)["structvpr"].startswith("TRAINING DATA")  # flagged, never a plain test set
    assert len(kitti.database) == 30 and len(study.stream(kitti)) == 150
    assert all(len(p) > 0 for p in kitti.positives())
    # rtabmap_loop: the whole sequence is streamed (map frames first); its loop matrix is the file's
    assert len(study.stream(rtab)) == 84 and len(rtab.database) == 40
    assert study.query_positions(rtab).tolist() == list(range(40, 84))
    loop_gt = study.loop_truth(rtab)
    assert loop_gt.shape == (84, 84) and int(loop_gt.sum()) == 228 and not np.triu(loop_gt).any()
    assert sum(len(p) > 0 for p in rtab.positives()) >= 40
    assert study.loop_truth(kitti) is None and study.query_positions(kitti).tolist() == list(range(150))


# --------------------------------------------------------------------------- end to end


def test_quick_study_end_to_end(tmp_path, shared_dir, torch_home, monkeypatch):
    monkeypatch.setenv("VPR_ROS_SHARED", str(shared_dir))
    script = _script()
    out = tmp_path / "acc"
    assert script.main(["--quick", "--out", str(out), "--shared", str(shared_dir)]) == 0
    summary = json.loads((out / "results.json").read_text())
    page = out / "results.md"
    text = page.read_text()

    # tables and figures written, figures small enough to commit
    for head in ("## Models", "## Bytes per frame on the link", "### nordland", "## Share of the quality gap",
                 "## Loop closure on rtabmap_loop", "tokyo_pair: similarity only"):
        assert head in text
    assert "**no weights" in text  # SciceVPR listed with the reason
    figs = {Path(p) for p in summary["figures"].values()}
    assert {f.name for f in figs} >= {"bandwidth_nordland.png", "recall_at_n_nordland.png",
                                      "montage_nordland.png", "loop_pr.png", "links_tokyo.png",
                                      "sequence_nordland.png"}
    for f in figs:
        assert f.is_file() and 2_000 < f.stat().st_size < 250_000, f
        assert f"]({f.parent.name}/{f.name})" in text  # linked from the page, relative to it

    # bytes/frame fall with JPEG quality on every dataset, and are real payloads (not raw sizes)
    for key, links in summary["links"].items():
        b = [links[f"jpeg_q{q}"]["bytes_per_frame"] for q in (50, 10, 5)]
        assert b[0] > b[1] > b[2] > 0, key
        assert links["h264_qp40"]["bytes_per_frame"] < links["none"]["bytes_per_frame"] / 10

    res = {(r["name"], r["model"], r["degradation"]): r for r in summary["results"]}
    r1 = {k: v["recalls"]["1"] if "1" in v["recalls"] else v["recalls"][1] for k, v in res.items()}
    # the LoQI student on held-out Nordland places: a clean link is at least as good as JPEG q5
    assert r1[("nordland", "loqi", "none")] >= r1[("nordland", "loqi", "jpeg_q5")]
    assert r1[("nordland", "loqi", "none")] > r1[("nordland", "imagenet", "none")]  # in-domain training helps
    assert res[("nordland", "loqi", "none")]["n_queries"] == 70

    # sequence matching: the quick links among the standard ones, L = 1 is the single frame, L = 20 helps
    seq = summary["sequence"]["recall_at_1"]
    assert set(seq) == {"none", "jpeg_q10", "h264_qp40"} and "## Sequence matching" in text
    assert seq["jpeg_q10"]["1"] == pytest.approx(r1[("nordland", "loqi", "jpeg_q10")])
    assert seq["jpeg_q10"]["20"] > seq["jpeg_q10"]["1"]

    lc = summary["loop_closure"]
    assert set(lc) == {"none", "jpeg_q10"}
    for link in lc.values():
        d = link["models"]["loqi"]
        assert 0.0 <= d["shipped"]["recall"] <= 1.0 and 0.0 <= d["shipped"]["precision"] <= 1.0
    assert lc["none"]["models"]["loqi"]["verified_recall_at_precision_1"] > 0.5
    scores = summary["pair_scores"]["tokyo_pair"]["loqi"]
    assert all(-1.0 <= v <= 1.0 for v in scores.values()) and not math.isnan(scores["none"])

    # a second run reuses every cached descriptor set and keeps hand-written text around the block
    page.write_text("# my title\n\nnotes before\n\n" + text[text.index(study.GEN_BEGIN):] + "\nnotes after\n")
    assert script.main(["--quick", "--out", str(out), "--shared", str(shared_dir)]) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["cache"]["described"] == 0 and again["cache"]["reused"] == summary["cache"]["described"]
    assert again["results"] == summary["results"]
    new = page.read_text()
    assert new.startswith("# my title\n\nnotes before\n\n") and new.rstrip().endswith("notes after")
    assert new.count(study.GEN_BEGIN) == 1
