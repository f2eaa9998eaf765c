"""The vpr-ros command line on real data: eval, build-map, degrade, and its error handling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vpr_ros.cli import main
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
        "from vpr_ros.cli import main\n"
        "sys.exit(main(['localize', '--params', 'config/localize.yaml']))\n"
    )
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=repo)
    assert out.returncode == 2, out.stderr
    assert "needs ROS 2 Python packages" in out.stderr and "Traceback" not in out.stderr
