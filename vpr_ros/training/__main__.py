"""``python -m vpr_ros.training train --config recipe.yaml`` (and export, bag-dataset)."""

import sys

from .cli import main

sys.exit(main())
