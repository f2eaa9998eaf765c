"""Shared fixtures. Tests that need ../shared skip with a reason when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("VPR_ROS_SHARED", REPO.parent / "shared")).resolve()


def _need(rel: str) -> Path:
    path = SHARED / rel
    if not path.exists():
        pytest.skip(f"needs {path} (set VPR_ROS_SHARED to the shared data folder)")
    return path


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return _need("")


@pytest.fixture(scope="session")
def nordland_dir() -> Path:
    return _need("data/nordland_64x32")


@pytest.fixture(scope="session")
def ie_tower_dir() -> Path:
    return _need("data/ie_tower")


@pytest.fixture(scope="session")
def rtabmap_dir() -> Path:
    return _need("data/rtabmap_loop")


@pytest.fixture(scope="session")
def kitti_dir() -> Path:
    return _need("data/kitti_first300")


@pytest.fixture(scope="session")
def torch_home(tmp_path_factory) -> Path:
    """A TORCH_HOME seeded with the offline torchvision MobileNetV2 ImageNet weights."""
    src = _need("weights/mobilenet_v2-b0353104.pth")
    home = Path(os.environ.get("TORCH_HOME", tmp_path_factory.mktemp("torch_home")))
    ckpt = home / "hub" / "checkpoints" / src.name
    if not ckpt.exists():
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        ckpt.symlink_to(src)
    os.environ["TORCH_HOME"] = str(home)
    return home


@pytest.fixture(scope="module")
def ros_env(tmp_path_factory):
    """DDS discovery confined to this host; rclpy needs HOME or ROS_LOG_DIR. Restored after the module.

    Skips without rclpy or the built messages. Modules whose every test starts nodes use it via
    ``pytestmark = ros_support.ROS_TESTS``.
    """
    pytest.importorskip("ros_support")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
        if not os.environ.get("ROS_LOG_DIR"):
            mp.setenv("ROS_LOG_DIR", str(tmp_path_factory.mktemp("ros_log")))
        if "HOME" not in os.environ:
            mp.setenv("HOME", str(tmp_path_factory.mktemp("home")))
        yield
