#!/usr/bin/env python3
"""Regenerate the docs' parameter and launch-argument tables and config/localize.yaml's comments
from the nodes' parameter specs (vpr_ros.ros.param_docs).

Usage::

    .venv/bin/python scripts/gen_param_docs.py           # rewrite what drifted
    .venv/bin/python scripts/gen_param_docs.py --check   # exit 1 naming the files that drifted
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vpr_ros.core.errors import VprError
from vpr_ros.ros.param_docs import write

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 when a file is out of date")
    a = p.parse_args(argv)
    try:
        stale = write(REPO, check=a.check)
    except (VprError, OSError) as exc:
        print(f"gen_param_docs: error: {exc}", file=sys.stderr)
        return 2
    for path in stale:
        verb = "out of date" if a.check else "rewritten"
        print(f"{path.relative_to(REPO)}: {verb}")
    return 1 if a.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
