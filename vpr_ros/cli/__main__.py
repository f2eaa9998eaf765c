"""``python -m vpr_ros.cli`` runs ``vpr-ros``."""

import sys

from vpr_ros.cli.main import main

sys.exit(main())
