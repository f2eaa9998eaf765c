"""Cross-domain part of the study: gate arithmetic, model cards read from checkpoints, a number recomputed."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from vpr_ros.core.images import save_image
from vpr_ros.core.models import create_model, save_checkpoint
from vpr_ros.core.models.card import (
    ModelCard,
    format_card,
    packaged_checkpoints,
    read_card,
    weights_digest,
    write_card,
)
from vpr_ros.studies import cross_domain

REPO = Path(__file__).resolve().parents[1]


def test_gate_rows_hand_computed():
    # teacher: clean 0.80, JPEG 0.60 (loss 0.20 -> the student must gain 0.5 * 0.20 = 0.10), H.264 0.80
    # (no loss -> needed 0: the student must not be worse than the teacher).
    teacher = {"none": {"R@1": 0.80}, "jpeg_q10": {"R@1": 0.60}, "h264_qp40": {"R@1": 0.80}}
    ok = {"none": {"R@1": 0.79}, "jpeg_q10": {"R@1": 0.71}, "h264_qp40": {"R@1": 0.80}}
    rows = cross_domain.gate(ok, teacher, ["none", "jpeg_q10", "h264_qp40"])
    assert [r["link"] for r in rows] == ["none", "jpeg_q10", "h264_qp40"]
    assert rows[0]["gain"] == pytest.approx(-0.01) and rows[0]["pass"]  # 0.79 >= 0.80 - 0.01
    assert rows[1]["needed"] == pytest.approx(0.10) and rows[1]["gain"] == pytest.approx(0.11)
    assert rows[1]["pass"] and rows[1]["beats"]
    assert rows[2]["needed"] == pytest.approx(0.0) and rows[2]["pass"] and not rows[2]["beats"]
    bad = {"none": {"R@1": 0.785}, "jpeg_q10": {"R@1": 0.69}, "h264_qp40": {"R@1": 0.79}}
    rows = cross_domain.gate(bad, teacher, ["none", "jpeg_q10", "h264_qp40"])
    assert [r["pass"] for r in rows] == [False, False, False]  # -0.015 < -0.01; 0.09 < 0.10; -0.01 < 0


def test_gate_margin_interval_from_per_query_hits():
    # Same hits for student and teacher, teacher clean = teacher link: every resample has gain 0, needed 0,
    # so the margin is exactly 0 (the clean row: + the 1-point tolerance).
    hits = [1, 0, 1, 1, 0, 1, 0, 1]
    same = {lb: {"R@1": sum(hits) / 8, "hit1": hits} for lb in ("none", "jpeg_q10")}
    rows = cross_domain.gate(same, same, ["none", "jpeg_q10"])
    assert rows[0]["margin_ci90"] == pytest.approx((0.01, 0.01))
    assert rows[1]["margin_ci90"] == pytest.approx((0, 0))
    # The student misses every query the teacher finds on the link: the margin is below 0 in every resample.
    teacher = {"none": {"R@1": 1.0, "hit1": [1] * 8}, "jpeg_q10": {"R@1": 1.0, "hit1": [1] * 8}}
    student = {"none": {"R@1": 1.0, "hit1": [1] * 8}, "jpeg_q10": {"R@1": 0.0, "hit1": [0] * 8}}
    row = cross_domain.gate(student, teacher, ["none", "jpeg_q10"])[1]
    assert not row["pass"] and row["margin_ci90"] == pytest.approx((-1.0, -1.0))


def test_card_domain_of_a_set():
    card = ModelCard(Path("x.pt"), "k", "t", "m", (96, 320), "KITTI 05", ["kitti"], ["kitti05"])
    assert card.domain("kitti05") == "train"
    assert card.domain("kitti00") == "in"  # the same family (KITTI), other images
    assert card.domain("rtabmap_loop") == "out" and card.domain("nordland") == "out"


def _tiny_checkpoint(path: Path, card: dict) -> Path:
    torch.manual_seed(0)
    net = create_model("structvpr_mobilenetv2", pretrained=False, preprocess={"input_size": [32, 64]})
    return save_checkpoint(net, path, meta={"method": "test", "card": card})


def test_write_card_changes_meta_only(tmp_path):
    path = _tiny_checkpoint(tmp_path / "m.pt", {"key": "tiny", "train_data": "nothing", "train_domains": []})
    (tmp_path / "m.json").write_text('{"method": "test"}\n')
    digest = weights_digest(path)
    assert write_card(path, {"train_domains": ["nordland"]})
    assert not write_card(path, {"train_domains": ["nordland"]})  # no change: the file is not rewritten
    card = read_card(path)
    assert (card.key, card.train_data, card.train_domains) == ("tiny", "nothing", ["nordland"])
    assert card.input_size == (32, 64)
    assert weights_digest(path) == digest
    assert '"nordland"' in (tmp_path / "m.json").read_text()


def _summary_rows(page: str) -> dict[tuple[str, str], list[str]]:
    """The cross-domain summary table of the results page: (model, domain) -> R@1 cells of the model."""
    block = page.split(cross_domain.BEGIN, 1)[1].split(cross_domain.END, 1)[0]
    table = block.split("### Summary", 1)[1].split("###", 1)[0]
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) > 3 and cells[0].startswith("`"):
            rows[(cells[0].strip("`"), cells[1])] = cells[3 : 3 + len(cross_domain.CROSS_LINKS)]
    return rows


def test_packaged_model_cards_are_read_from_the_checkpoints(capsys):
    """`vpr-ros models` and docs/results.md show what each packaged checkpoint's meta["card"] holds."""
    from vpr_ros.cli.main import main
    from vpr_ros.core.models import DEFAULT_WEIGHTS

    paths = packaged_checkpoints()
    assert paths, "no packaged checkpoints"
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    page = (REPO / "docs" / "results.md").read_text(encoding="utf-8")
    rows = _summary_rows(page) if cross_domain.BEGIN in page else {}
    for path in paths:
        card = read_card(path)
        meta = torch.load(path, map_location="cpu", weights_only=True)["meta"]["card"]
        assert card.train_data == meta["train_data"] and card.train_domains == meta["train_domains"]
        for line in format_card(card, default=path.resolve() == DEFAULT_WEIGHTS.resolve()):
            assert line in out, f"{path.name}: `vpr-ros models` lacks the card line {line!r}"
        summary = card.cross_domain.get("summary", {})
        for dom, text in (("in", "in domain"), ("out", "out of domain")):
            if dom in summary and rows:
                want = [f"{100 * summary[dom]['R@1'][lb]:.1f}" for lb in card.cross_domain["links"]]
                assert rows[(card.key, text)] == want, f"{path.name}: docs/results.md differs from its card"


def _loop_fixture(root: Path) -> Path:
    """A 12-frame rtabmap_loop-like sequence: frames 1-4 are the map (12 // 2 - 2), 5-12 revisit them."""
    rng = np.random.default_rng(0)
    base = [rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) for _ in range(4)]
    folder = root / "data" / "rtabmap_loop"
    (folder / "images").mkdir(parents=True)
    gt = np.zeros((12, 12), dtype=int)
    for i in range(12):
        img = base[i % 4] if i < 4 else np.clip(base[i % 4] + rng.normal(0, 20, (48, 64, 3)), 0, 255)
        save_image(folder / "images" / f"{i + 1}.jpg", img.astype(np.uint8))
        if i >= 4:
            gt[i, i % 4] = 1
    np.savetxt(folder / "gt_loop_matrix.txt", gt, fmt="%d")
    return root


def test_one_cross_domain_number_recomputed_through_the_public_api(tmp_path, torch_home):
    from vpr_ros.core.extract import DescriptorExtractor
    from vpr_ros.core.models import load_model
    from vpr_ros.core.transmission import TransmissionConfig, Transmitter
    from vpr_ros.data.places import load_rtabmap_loop
    from vpr_ros.eval.metrics import recall_at_n
    from vpr_ros.studies.accuracy import StudyConfig

    shared = _loop_fixture(tmp_path / "shared")
    ckpt = _tiny_checkpoint(tmp_path / "w" / "tiny.pt", {"key": "tiny", "title": "tiny test student",
                                                        "train_data": "Nordland (pretend)",
                                                        "train_domains": ["nordland"]})
    shutil.copy(REPO / "docs" / "results.md", tmp_path / "page.md")
    cfg = StudyConfig(out=tmp_path / "out", page=None, shared=shared, datasets=("rtabmap_loop",),
                      batch_size=8, progress=False, device="cpu")
    cx = cross_domain.CrossConfig(links=("none", "jpeg:10"), checkpoints=[ckpt], backend="torch",
                                  deploy_size=(32, 64), page=tmp_path / "page.md")
    data = cross_domain.run_cross_domain(cfg, cx)
    got = data["results"]["tiny"]["rtabmap_loop"]["jpeg_q10"]

    # The same number by hand: map = frames 1-4 (high quality), queries = frames 5-12 sent as JPEG q10.
    rtab = load_rtabmap_loop(shared / "data" / "rtabmap_loop")
    recs, gt = rtab.database, rtab.truth_matrix()
    ext = DescriptorExtractor(load_model(ckpt), device="cpu", backend="torch")
    db = ext([r.load() for r in recs[:4]])
    link = Transmitter(TransmissionConfig.parse("jpeg:10"))
    q = ext([link.process(r.load()).image for r in recs])[4:]
    ids = np.argsort(-(q @ db.T), axis=1, kind="stable")
    rec = recall_at_n(ids, [np.nonzero((gt | gt.T)[i, :4])[0] for i in range(4, 12)])
    assert got["R@1"] == pytest.approx(rec[1]) and got["R@5"] == pytest.approx(rec[5])
    assert got["queries"] == 8 and got["hits_at_1"] == round(8 * rec[1])

    card = read_card(ckpt)  # written back into the checkpoint, with the set's domain from the card
    entry = card.cross_domain["sets"]["rtabmap_loop"]
    assert entry["domain"] == "out" and entry["jpeg_q10"]["R@1"] == pytest.approx(rec[1])
    assert card.cross_domain["summary"]["out"]["R@1"]["jpeg_q10"] == pytest.approx(rec[1])
    page = (tmp_path / "page.md").read_text()
    assert page.count(cross_domain.BEGIN) == 1 and "## What this shows" in page
    row = next(line for line in page.splitlines() if line.startswith("| `tiny` | out of domain |"))
    assert f"{100 * rec[1]:.1f}" in row
    # the gate row of JPEG q10 against the ImageNet student at 32x64, from the same numbers
    t = data["results"]["imagenet@32x64"]["rtabmap_loop"]
    gate_row = data["models"]["tiny"]["gate"]["rtabmap_loop"][1]
    assert gate_row["needed"] == pytest.approx(0.5 * (t["none"]["R@1"] - t["jpeg_q10"]["R@1"]))
    assert gate_row["gain"] == pytest.approx(rec[1] - t["jpeg_q10"]["R@1"])
    # a re-run computes nothing new (the descriptors are cached; the card write did not change the weights)
    again = cross_domain.run_cross_domain(cfg, cx)
    assert again["described"] == 0 and again["results"]["tiny"] == data["results"]["tiny"]
    assert re.search(r"\| `tiny` \| rtabmap_loop \| out \| JPEG q10 \|", page)


def test_int8_export_is_found_by_the_model_hash_and_close_to_fp32(tmp_path):
    pytest.importorskip("onnxruntime")
    from vpr_ros.core.backends import find_int8_export, make_backend, quantize_int8
    from vpr_ros.core.errors import ModelError
    from vpr_ros.core.models import load_model

    model = load_model(_tiny_checkpoint(tmp_path / "m.pt", {"key": "tiny"}))
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) for _ in range(6)]
    path = quantize_int8(model, images, tmp_path / "q" / "m.int8.onnx", cache_dir=tmp_path / "onnx")
    assert find_int8_export(model, tmp_path / "q") == path
    other = create_model("structvpr_mobilenetv2", pretrained=False, preprocess={"input_size": [32, 64]})
    with pytest.raises(ModelError, match="bench/int8.py"):
        find_int8_export(other, tmp_path / "q")  # other weights: no calibrated export for them
    with pytest.raises(ModelError, match="onnx"):
        make_backend(model, "torch", device="cpu", precision="int8")
    q = make_backend(model, "onnx", device="cpu", precision="int8", cache_dir=tmp_path / "q", threads=1)
    f = make_backend(model, "onnx", device="cpu", cache_dir=tmp_path / "onnx", threads=1)
    cos = (q(images) * f(images)).sum(1)
    assert q.describe()["onnx"] == str(path) and cos.min() > 0.99


def test_int8_calibration_methods_are_named_and_recorded(tmp_path):
    pytest.importorskip("onnxruntime")
    import onnx
    from onnx import numpy_helper

    from vpr_ros.core.backends import quantize_int8
    from vpr_ros.core.errors import ModelError
    from vpr_ros.core.models import load_model

    model = load_model(_tiny_checkpoint(tmp_path / "m.pt", {"key": "tiny"}))
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) for _ in range(4)]
    images[0] = np.zeros_like(images[0])  # an outlier image: black, far from the others
    with pytest.raises(ModelError, match="minmax, moving-average"):
        quantize_int8(model, images, tmp_path / "x.onnx", cache_dir=tmp_path / "onnx", calibrate="entropy")
    ranges = {}
    for how in ("minmax", "moving-average"):
        path = quantize_int8(model, images, tmp_path / how / "m.int8.onnx", cache_dir=tmp_path / "onnx",
                             calibrate=how)
        q = onnx.load(str(path))
        assert {p.key: p.value for p in q.metadata_props}["vpr_ros.calibration"] == how
        scales = [numpy_helper.to_array(t) for t in q.graph.initializer if t.name.endswith("_scale")]
        ranges[how] = float(np.sum([s for s in scales if s.ndim == 0]))  # per-tensor activation scales
    # the mean of per-image extremes lies inside the extremes over all images: no range grows
    assert ranges["moving-average"] < ranges["minmax"]


def test_int8_descriptors_are_cached_per_int8_export_not_per_weights(tmp_path, torch_home, monkeypatch):
    pytest.importorskip("onnxruntime")
    from vpr_ros.core.backends import default_cache_dir, quantize_int8
    from vpr_ros.core.models import load_model
    from vpr_ros.studies.accuracy import StudyConfig

    monkeypatch.setenv("VPR_ROS_CACHE", str(tmp_path / "cache"))
    shared = _loop_fixture(tmp_path / "shared")
    ckpt = _tiny_checkpoint(tmp_path / "w" / "tiny.pt", {"key": "tiny", "train_domains": ["nordland"]})
    model = load_model(ckpt)
    rng = np.random.default_rng(0)
    calib = [rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) for _ in range(4)]
    calib[0] = np.zeros_like(calib[0])
    cfg = StudyConfig(out=tmp_path / "out", page=None, shared=shared, datasets=("rtabmap_loop",),
                      batch_size=8, progress=False, device="cpu")
    cx = cross_domain.CrossConfig(links=("none",), checkpoints=[ckpt], backend="onnx", precision="int8",
                                  deploy_size=(32, 64), write_cards=False)
    target = default_cache_dir() / "tiny.int8.onnx"
    quantize_int8(model, calib, target, calibrate="minmax")
    first = cross_domain.evaluate(cfg, cx)
    assert first["described"] > 0
    assert cross_domain.evaluate(cfg, cx)["described"] == 0  # same export: every descriptor reused
    quantize_int8(model, calib, target, calibrate="moving-average")  # same weights, another int8 model
    again = cross_domain.evaluate(cfg, cx)
    assert again["described"] == 2  # the checkpoint's map and its queries again; ImageNet (fp32) reused
