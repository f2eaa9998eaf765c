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
#: The students shipped with the package (produced by ``vpr_ros.training``), by their model card's key:
#: ``weights="loqi"`` etc. picks one (``vpr-ros models`` prints their cards).
PACKAGED = {
    "loqi": WEIGHTS_DIR / "structvpr_mobilenetv2_loqi.pt",  # Nordland LoQI student, 32x64
    "structvpr": WEIGHTS_DIR / "structvpr_mobilenetv2_kitti.pt",  # KITTI StructVPR student, 96x320
    "general": WEIGHTS_DIR / "structvpr_mobilenetv2_general.pt",  # general low-quality student, 240x320
}
#: The key of the default student (``weights="default"`` and no weights at all).
DEFAULT_KEY = "general"


def weights_file(weights: str | os.PathLike | None) -> Path | None:
    """The checkpoint file that ``weights`` (as ``resolve_model`` and the localizer's ``weights``
    parameter take it: ``default`` / empty, a packaged key, a path) names, or None when it names no
    existing file (``imagenet``, a model name, a missing path). Loads nothing."""
    if weights is None or str(weights) in ("", "default"):
        path = PACKAGED[DEFAULT_KEY]
    elif isinstance(weights, str) and weights in PACKAGED:
        path = PACKAGED[weights]
    else:
        path = Path(weights).expanduser()
    return path if path.is_file() else None


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
