"""The vpr-ros command line on real data: eval, build-map, degrade, and its error handling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from vpr_ros.cli.main import main
from vpr_ros.core.mapdb import PlaceMap


def test_eval_writes_table_json_and_plots(nordland_dir, torch_home, tmp_path, capsys):
    out = tmp_path / "eval"
    rc = main(["eval", "--dataset", "nordland", "--root", str(nordland_dir), "--every", "40",
               "--model", "structvpr_mobilenetv2", "--input-size", "64x128", "--device", "cpu",
               "--degrade", "none", "--degrade", "jpeg:10", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "R@1" in text and "jpeg_q10" in text
    results = json.loads((out / "results.json").read_text())["results"]
    assert [r["degradation"] for r in results] == ["none", "jpeg_q10"]
    assert results[1]["bytes_per_frame"] < results[0]["bytes_per_frame"]  # JPEG is smaller than raw
    assert all(0.0 <= r["recalls"]["1"] <= r["recalls"]["5"] <= 1.0 for r in results)
    for name in ("recall_at_n.png", "recall_vs_bytes.png", "montage_none.png", "montage_jpeg_q10.png"):
        assert (out / name).stat().st_size > 1000


def test_build_map_from_an_image_folder(rtabmap_dir, torch_home, tmp_path, capsys):
    rc = main(["build-map", "--images", str(rtabmap_dir / "images"), "--model", "gem_mobilenetv2",
               "--input-size", "48x64", "--device", "cpu", "--out", str(tmp_path / "loop")])
    assert rc == 0
    place_map = PlaceMap.load(tmp_path / "loop.vprmap", expected_dim=320, expected_model="gem_mobilenetv2")
    assert len(place_map) == 84
    assert "84 entries" in capsys.readouterr().out


def test_build_map_with_onnx_backend_matches_torch(rtabmap_dir, torch_home, tmp_path, monkeypatch, capsys):
    """--backend onnx --threads 1: the same map as the torch backend (descriptors within 1e-4)."""
    monkeypatch.setenv("VPR_ROS_CACHE", str(tmp_path / "cache"))
    common = ["build-map", "--images", str(rtabmap_dir / "images"), "--model", "structvpr_mobilenetv2",
              "--input-size", "48x64", "--device", "cpu"]
    assert main([*common, "--out", str(tmp_path / "torch")]) == 0
    assert main([*common, "--backend", "onnx", "--threads", "1", "--out", str(tmp_path / "onnx")]) == 0
    assert list((tmp_path / "cache" / "onnx").glob("*.onnx")), "no ONNX export was made"
    ref, got = PlaceMap.load(tmp_path / "torch"), PlaceMap.load(tmp_path / "onnx")
    assert len(got) == len(ref) == 84
    np.testing.assert_allclose(got.descriptors(), ref.descriptors(), atol=1e-4)


def test_eval_and_demo_take_backend_options(nordland_dir, torch_home, tmp_path, monkeypatch, capsys):
    """eval runs with --backend onnx; demo hands backend/precision/threads to its ROS graph part."""
    from vpr_ros.cli import main as cli

    monkeypatch.setenv("VPR_ROS_CACHE", str(tmp_path / "cache"))
    rc = main(["eval", "--dataset", "nordland", "--root", str(nordland_dir), "--every", "80", "--model",
               "structvpr_mobilenetv2", "--input-size", "64x128", "--device", "cpu", "--backend", "onnx",
               "--threads", "1", "--out", str(tmp_path / "eval")])
    assert rc == 0 and "R@1" in capsys.readouterr().out
    args = cli.build_parser().parse_args(["demo", "--backend", "onnx", "--threads", "1",
                                          "--out", str(tmp_path)])
    seen = {}
    demo = pytest.importorskip("vpr_ros.ros.demo")
    monkeypatch.setattr(demo, "run_graph_demo", lambda **kw: seen.update(kw) or {})
    cli._demo_ros(args, nordland_dir)
    assert (seen["backend"], seen["precision"], seen["threads"]) == ("onnx", "fp32", 1)


def test_backend_choices_match_the_library():
    from vpr_ros.cli.main import BACKEND_CHOICES, PRECISION_CHOICES
    from vpr_ros.core.backends import BACKENDS, PRECISIONS

    assert BACKEND_CHOICES == BACKENDS and PRECISION_CHOICES == PRECISIONS


@pytest.mark.parametrize("argv", [["eval", "--backend", "tensorrt"],
                                  ["build-map", "--threads", "-1", "--out", "x"],
                                  ["demo", "--precision", "fp8"]])
def test_bad_backend_options_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    option = next(a for a in argv if a.startswith("--"))
    assert f"error: argument {option}" in err and "Traceback" not in err


def test_degrade_reports_bytes_and_writes_received_frames(rtabmap_dir, tmp_path, capsys):
    rc = main(["degrade", "--images", str(rtabmap_dir / "images"), "--limit", "5",
               "--spec", "jpeg:10", "--spec", "h264:40", "--out", str(tmp_path)])
    assert rc == 0
    assert len(list((tmp_path / "jpeg_q10").glob("*.png"))) == 5
    assert len(list((tmp_path / "h264_qp40").glob("*.png"))) == 5
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(("jpeg_q10", "h264_qp40"))]
    assert len(lines) == 2 and all(float(ln.split()[2]) > 0 for ln in lines)


@pytest.mark.parametrize(("argv", "message"), [
    (["eval", "--dataset", "nordland", "--root", "/nonexistent/nordland"], "nonexistent"),
    (["eval", "--dataset", "nordland", "--root", "/tmp", "--degrade", "jpeg:500"], "jpeg"),
    (["build-map", "--images", "/tmp", "--model", "resnet9000", "--out", "/tmp/x"], "unknown model"),
    (["build-map", "--images", "/nonexistent", "--weights", "/nonexistent/w.pt", "--out", "/tmp/x"],
     "checkpoint file not found"),
    (["degrade", "--images", "/nonexistent", "--spec", "jpeg:10", "--out", "/tmp/x"], "not a folder"),
    (["build-map", "--images", "/tmp", "--model", "structvpr_mobilenetv2", "--device", "cpu", "--precision",
      "fp16", "--out", "/tmp/x"], "fp16 needs a CUDA device"),
])
def test_errors_are_one_clear_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error:" in err and message in err and "Traceback" not in err


def test_ros_commands_without_ros_packages_give_one_clear_line():
    """A pip install without the ROS extra: `vpr-ros localize` explains what is missing."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'rclpy': raise ModuleNotFoundError(name=name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from vpr_ros.cli.main import main\n"
        "sys.exit(main(['localize', '--params', 'config/localize.yaml']))\n"
    )
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=repo)
    assert out.returncode == 2, out.stderr
    assert "needs ROS 2 Python packages" in out.stderr and "Traceback" not in out.stderr


def test_demo_runs_on_another_place_set(shared_dir, torch_home, tmp_path, capsys):
    """``demo --set rtabmap_loop``: the study's corridor protocol (40 map frames, the revisit as queries),
    every demo link, and the default set follows the default student."""
    from vpr_ros.cli.main import DEFAULT_DEMO_SET, DEMO_SETS
    from vpr_ros.core.models.resolve import DEFAULT_KEY

    assert DEFAULT_DEMO_SET.get(DEFAULT_KEY, "nordland") in DEMO_SETS
    out = tmp_path / "demo"
    rc = main(["demo", "--shared", str(shared_dir), "--set", "rtabmap_loop", "--no-ros", "--model",
               "structvpr_mobilenetv2", "--input-size", "48x64", "--device", "cpu", "--out", str(out)])
    assert rc == 0
    assert "RTAB-Map loop sequence" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())["results"]
    assert [r["degradation"] for r in results] == ["none", "jpeg_q10", "res_0.25", "h264_qp40"]
    assert {r["n_queries"] for r in results} == {44} and {r["name"] for r in results} == {"rtabmap_loop"}


def test_nordland_demo_keeps_to_the_held_out_places(shared_dir, torch_home, tmp_path, capsys):
    """``demo --set nordland``: the places no packaged student trained on (the LoQI student's recorded
    split, 700 of them), also now that the default student's own card records no Nordland split."""
    from vpr_ros.studies.accuracy import held_out_split

    assert held_out_split() is not None
    out = tmp_path / "demo"
    rc = main(["demo", "--shared", str(shared_dir), "--set", "nordland", "--no-ros", "--model",
               "structvpr_mobilenetv2", "--input-size", "32x64", "--device", "cpu", "--degrade", "none",
               "--out", str(out)])
    assert rc == 0
    assert "places held out from the packaged students' training: blocks of 100 frames, every 5th from 2" in (
        capsys.readouterr().out)
    results = json.loads((out / "results.json").read_text())["results"]
    assert [r["n_queries"] for r in results] == [700]
