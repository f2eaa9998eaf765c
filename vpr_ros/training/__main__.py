"""`python -m vpr_ros.training` moved: use `vpr-ros train` (`python -m vpr_ros.cli train`)."""

import sys

print("python -m vpr_ros.training moved: use `vpr-ros train ...` (or `python -m vpr_ros.cli train ...`)",
      file=sys.stderr)
sys.exit(2)
