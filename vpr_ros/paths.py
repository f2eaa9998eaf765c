"""Where things live: shared data, packaged weights, caches (environment variables with defaults).

* ``VPR_ROS_SHARED``: shared data sets, teacher weights, papers; default ``../shared`` beside the cwd.
* ``VPR_ROS_CACHE``: this package's caches (ONNX exports, ...); default ``$XDG_CACHE_HOME/vpr_ros`` or
  ``~/.cache/vpr_ros``.
* ``TORCH_HOME``: torchvision / torch.hub weights; default ``~/.cache/torch``.
"""

from __future__ import annotations

import os
from pathlib import Path

#: The checkpoints shipped inside the package.
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def shared_root() -> Path:
    """``$VPR_ROS_SHARED``, else ``../shared`` beside the current directory."""
    return Path(os.environ.get("VPR_ROS_SHARED") or Path.cwd().parent / "shared")


def cache_dir(kind: str = "") -> Path:
    """``$VPR_ROS_CACHE[/kind]``, else ``$XDG_CACHE_HOME/vpr_ros[/kind]`` or ``~/.cache/vpr_ros[/kind]``."""
    if os.environ.get("VPR_ROS_CACHE"):
        base = Path(os.environ["VPR_ROS_CACHE"])
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vpr_ros"
    return base / kind if kind else base


def torch_home() -> Path:
    """``$TORCH_HOME``, else ``~/.cache/torch`` (where torchvision looks for ``hub/checkpoints``)."""
    return Path(os.environ.get("TORCH_HOME") or "~/.cache/torch").expanduser()
