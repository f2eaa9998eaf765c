"""The whole graph: params file, in-process runner (as a real process), the launch description, demo.

``vpr-ros localize`` is started from config/localize.yaml in a subprocess and driven over DDS
from the test process (images between processes: ``FASTDDS_BUILTIN_TRANSPORTS=LARGE_DATA``),
then stopped with SIGTERM (the map is saved).
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("ros_support")  # rclpy and the built messages, or skip saying which is missing

from rclpy.qos import QoSProfile, qos_profile_sensor_data
from ros_support import REPO, ROS_TESTS, fresh_namespace
from sensor_msgs.msg import Image
from std_msgs.msg import Header
from vpr_ros_msgs.msg import PlaceMatch

from vpr_ros.core.errors import ConfigError
from vpr_ros.core.mapdb import PlaceMap
from vpr_ros.data.places import load_nordland
from vpr_ros.ros.conversions import float_to_stamp, rgb_to_image_msg
from vpr_ros.ros.graph import apply_sets, load_params_file, wire
from vpr_ros.ros.runner import InProcessGraph, overrides_for

pytestmark = ROS_TESTS
CONFIG = REPO / "config" / "localize.yaml"
LAUNCH = REPO / "launch" / "localize.launch.py"


@pytest.fixture(scope="module", autouse=True)
def large_data(ros_env):
    """Images between processes: Fast DDS's LARGE_DATA transport (restored after the module)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTDDS_BUILTIN_TRANSPORTS", "LARGE_DATA")
        yield


# --------------------------------------------------------------------------- params file


def test_sets_wiring_and_errors(tmp_path):
    params = apply_sets(load_params_file(CONFIG), ["localizer.top_k=3", "localizer.min_score=0",
                                                   "transmitter.jpeg_quality=40", "localizer.source=007",
                                                   "localizer.require_pose=true"])
    loc = params["localizer"]
    assert loc["top_k"] == 3 and loc["source"] == "007" and loc["require_pose"] is True
    assert [p.value for p in overrides_for("localizer", params) if p.name == "min_score"] == [0.0]  # widened
    wired = wire(params, use_transmitter=True)
    assert wired["transmitter"]["image_topic"] == "camera/image_raw"  # relative: namespaces apply
    assert wired["localizer"]["image_topic"] == wired["transmitter"]["output_topic"]
    assert wired["localizer"]["transmission_stats_topic"] == wired["transmitter"]["stats_topic"]
    assert wired["loop_closure"]["image_topic"] == wired["localizer"]["image_topic"]
    assert wired["loop_closure"]["match_topic"] == wired["localizer"]["match_topic"]
    assert wire(params, use_transmitter=False)["localizer"]["image_topic"] == "camera/image_raw"
    with pytest.raises(ConfigError, match="expected NODE.PARAM=VALUE"):
        apply_sets(params, ["top_k=3"])
    with pytest.raises(ConfigError, match="expected int"):
        apply_sets(params, ["localizer.top_k=three"])
    with pytest.raises(ConfigError, match="unknown parameter.*top_kk"):
        overrides_for("localizer", apply_sets(params, ["localizer.top_kk=3"]))
    bad = tmp_path / "bad.yaml"
    bad.write_text("localizer:\n  top_k: 3\n")
    with pytest.raises(ConfigError, match="ros__parameters"):
        load_params_file(bad)
    wild = tmp_path / "wild.yaml"
    wild.write_text("/**:\n  ros__parameters:\n    max_pixels: 1000\n    use_sim_time: false\n"
                    "localizer:\n  ros__parameters:\n    nested: {a: 1}\n")
    loaded = load_params_file(wild)
    assert loaded["*"] == {"max_pixels": 1000, "use_sim_time": False}
    assert loaded["localizer"] == {"nested.a": 1}


def test_launch_description_builds_when_launch_is_installed():
    pytest.importorskip("launch_ros", reason="launch/launch_ros have no PyPI wheels; the launch file was run "
                                             "with LaunchService from source (docs/ros.md)")
    from ament_index_python.packages import PackageNotFoundError, get_package_share_directory

    try:
        get_package_share_directory("vpr_ros")
    except PackageNotFoundError:
        pytest.skip("vpr_ros is not installed in an ament prefix (colcon build, docs/colcon.md)")
    import importlib.util

    spec = importlib.util.spec_from_file_location("localize_launch", LAUNCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ld = mod.generate_launch_description()
    declared = {a.name: a for a in ld.get_launch_arguments()}
    assert {"params_file", "camera_topic", "use_transmitter", "use_loop_closure"} <= set(declared)
    assert all(a.description for a in declared.values())


# --------------------------------------------------------------------------- runner process


class RunnerProcess:
    """``python -m vpr_ros.cli localize ...`` with its output collected line by line."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "vpr_ros.cli", "localize", *args], cwd=REPO,
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip())

    def wait_line(self, text: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None and not self._reader.is_alive() and self.lines.empty():
                    return False
                continue
            self.log.append(line)
            if text in line:
                return True
        return False

    def stop(self, sig: int, timeout: float = 60.0) -> int:
        """Send ``sig``, wait for the exit status, collect the rest of the output."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        rc = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10.0)
        while not self.lines.empty():
            self.log.append(self.lines.get())
        return rc


def test_runner_from_config_maps_localizes_and_saves_on_sigterm(nordland_dir, torch_home, tmp_path):
    """``vpr-ros localize --transmitter`` in mode both: matches through JPEG q=10, map saved on SIGTERM."""
    ns = fresh_namespace()
    env = {**os.environ, "TORCH_HOME": str(torch_home), "PYTHONUNBUFFERED": "1"}
    frames = [r.load() for r in load_nordland(nordland_dir, every=200).database][:8]
    map_dir = tmp_path / "runner_map"
    args = ["--params", str(CONFIG), "--transmitter", "--set", f"localizer.map_path={map_dir}",
            "--set", "localizer.mode=both", "--set", "localizer.weights=imagenet",
            "--set", "localizer.input_size=native", "--set", "localizer.device=cpu",
            "--set", f"localizer.image_topic={ns}/camera", "--set", f"localizer.match_topic={ns}/match",
            "--set", f"transmitter.output_topic={ns}/link",
            "--set", f"transmitter.stats_topic={ns}/link_stats"]
    with InProcessGraph() as graph:
        probe = graph.add(graph.node("runner_probe"))
        matches: dict[int, PlaceMatch] = {}
        def first_answer(m: PlaceMatch) -> None:  # a resend's answer repeats the first
            matches.setdefault(m.header.stamp.sec, m)

        sub = probe.create_subscription(PlaceMatch, f"{ns}/match", first_answer, QoSProfile(depth=100))
        pub = probe.create_publisher(Image, f"{ns}/camera", qos_profile_sensor_data)
        run = RunnerProcess(args, env)
        try:
            assert run.wait_line("vpr-ros localize: running transmitter, localizer", 90.0), "\n".join(run.log)
            assert graph.wait_matched([pub], [sub], 60.0), "runner and probe not matched"
            for first in (100, 200):  # the first pass builds the map, the second revisits it
                for i, frame in enumerate(frames):
                    # best effort into another process: resend until answered (a repeated stamp is
                    # answered again, never a second place; the first answer is kept)
                    header = Header(stamp=float_to_stamp(first + i), frame_id="c")
                    msg = rgb_to_image_msg(frame, "rgb8", header)
                    sent = graph.send_until(lambda m=msg: pub.publish(m), lambda s=first + i: s in matches,
                                            60.0, resend_every=3.0)
                    assert sent, (sorted(matches), run.log)
        finally:
            rc = run.stop(signal.SIGTERM)
    assert rc == 0 and any("stopped cleanly" in line for line in run.log), "\n".join(run.log)
    assert any(f"saved {2 * len(frames)} places" in line for line in run.log), "\n".join(run.log)
    saved = PlaceMap.load(map_dir)
    assert len(saved) == 2 * len(frames) and saved.model == "structvpr_mobilenetv2@imagenet"
    assert [round(e.stamp) for e in saved.entries()] == [*range(100, 108), *range(200, 208)]
    assert not matches[100].matches  # nothing in the map yet
    ids = [matches[first + i].query_id for first in (100, 200) for i in range(len(frames))]
    assert ids == sorted(set(ids))  # answered in order; resends only add to the count between them
    for i in range(len(frames)):
        m = matches[200 + i]
        assert m.degradation == "jpeg_q10" and m.model == "structvpr_mobilenetv2@imagenet"
        assert len(m.matches) == 5


def test_runner_gives_the_loop_closure_node_the_threshold_on_the_weights_card(tmp_path):
    """``vpr-ros localize --loop-closure`` with ``localizer.weights=loqi``: the loop-closure node starts at
    the 0.85 on loqi's card (not the default student's 0.96); a threshold the params give wins."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for extra, expected in (([], "score >= 0.85,"), (["loop_closure.score_threshold=0.9"], "score >= 0.9,")):
        ns = fresh_namespace()
        sets = ["localizer.weights=loqi", "localizer.mode=map", f"localizer.map_path={tmp_path / ns[1:]}",
                f"localizer.image_topic={ns}/camera", f"localizer.match_topic={ns}/match", *extra]
        run = RunnerProcess(["--params", str(CONFIG), "--loop-closure",
                             *(a for s in sets for a in ("--set", s))], env)
        try:
            assert run.wait_line(expected, 90.0), "\n".join(run.log)
        finally:
            rc = run.stop(signal.SIGTERM)
        assert rc == 0, "\n".join(run.log)


def test_runner_refuses_bad_configuration(capsys):
    from vpr_ros.cli.main import main

    assert main(["localize", "--params", str(CONFIG), "--set", "localizer.top_k=0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("vpr-ros localize: error: localizer: parameter 'top_k' must be in [1, 100]")
    assert main(["localize", "--params", str(CONFIG), "--set", "localizer.top_kk=1"]) == 2
    assert "unknown parameter(s) for node 'localizer': top_kk" in capsys.readouterr().err


# --------------------------------------------------------------------------- demo


def test_graph_demo_agrees_with_offline(nordland_dir, torch_home, tmp_path):
    from vpr_ros.data.places import nordland_sample
    from vpr_ros.ros.demo import run_graph_demo

    places = nordland_sample(nordland_dir, every=3, max_places=24)
    assert len(places.queries) <= 24
    paths = run_graph_demo(dataset=places, out_dir=tmp_path, weights="imagenet", input_size="native",
                           max_frames=12, rate_hz=30.0)
    result = json.loads(paths["ros_graph_json"].read_text())
    assert paths["ros_graph_plot"].stat().st_size > 10_000
    assert result["agree"] and len(result["runs"]) == 2
    full, jpeg = result["runs"]
    assert full["place_matches_received"] == full["frames"] == result["queries"] <= 12
    assert result["query_every"] == 2 and result["database"] == len(places.database)
    assert full["recall_graph"] == full["recall_offline"] and jpeg["recall_graph"] == jpeg["recall_offline"]
    assert jpeg["degradation_label"] == "jpeg_q10" and jpeg["bytes_per_frame"] < full["bytes_per_frame"] / 3
    assert full["latency_e2e_ms"]["p50"] > 0
