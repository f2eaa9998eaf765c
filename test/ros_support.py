"""Helpers shared by the tests that start a real rclpy/DDS graph.

Importing this module fails with the reason when rclpy or a message package is missing, so a
module of such tests starts with ``pytest.importorskip("ros_support")`` and sets
``pytestmark = ROS_TESTS`` (the ``ros`` marker and the ``ros_env`` fixture of conftest.py).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from vpr_ros.core.timeline import to_seconds

for _module, _hint in (("rclpy", "needs rclpy (pip install 'ros-rclpy[fastrtps]')"),
                       ("vpr_ros_msgs.msg", "vpr_ros_msgs is not built: run `python scripts/build_msgs.py` "
                                            "in the venv"),
                       ("diagnostic_msgs.msg", "needs ros-diagnostic-msgs (pip install -e '.[ros]')")):
    try:
        importlib.import_module(_module)
    except ImportError as _exc:
        raise ImportError(_hint) from _exc

REPO = Path(__file__).resolve().parents[1]
#: First stamp (s) of the frames the tests publish.
T0 = 1_700_000_000.0
#: ``pytestmark`` of a module whose every test runs on a graph.
ROS_TESTS = [pytest.mark.ros, pytest.mark.usefixtures("ros_env")]


def unique(prefix: str, n: int = 6) -> str:
    """``prefix`` with a random hex suffix: node names, topic namespaces of one test."""
    return f"{prefix}_{uuid.uuid4().hex[:n]}"


def fresh_namespace() -> str:
    """A topic namespace no other test uses."""
    return "/" + unique("vpr_test", 10)


def stamp_key(stamp: Any) -> float:
    """A ``builtin_interfaces/Time`` as seconds rounded to the ms: the key messages are collected by."""
    return round(to_seconds(stamp), 3)


def run_node_main(module: str, params: dict[str, Any], timeout: float = 60.0,
                  **env: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """Run ``python -m vpr_ros.ros.<module> --ros-args -p NAME:=VALUE ...`` confined to this host.

    Returns the finished process and the lines of its stderr that contain ``error:``.
    """
    cmd = [sys.executable, "-m", f"vpr_ros.ros.{module}", "--ros-args"]
    for name, value in params.items():
        cmd += ["-p", f"{name}:={value}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                         env={**os.environ, "ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST", **env})
    return out, [line for line in out.stderr.splitlines() if "error:" in line]
