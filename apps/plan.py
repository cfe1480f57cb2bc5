"""``bac-plan show PLAN.json [--heatmap OUT.png]``: summary and blocks-by-steps heatmap.

Any :class:`bac.BacError` (a missing, truncated or malformed plan file) is one
line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bac.apps.common import debug_requested
from bac.errors import BacError
from bac.plan import Plan


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bac-plan", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    show = commands.add_parser("show", help="print a plan's summary and draw its heatmap")
    show.add_argument("plan", type=Path)
    show.add_argument("--heatmap", type=Path, help="image path (default: next to the plan, .png)")
    show.add_argument("--no-heatmap", action="store_true", help="print the summary only")
    args = parser.parse_args(argv)

    try:
        plan = Plan.load(args.plan)
    except BacError as err:  # the message names the file and the field
        if debug_requested():
            raise
        print("error: cannot read plan: " + " ".join(str(err).split()), file=sys.stderr)
        return 2
    print(plan.summary())
    if not args.no_heatmap:
        out = args.heatmap or args.plan.with_suffix(".png")
        try:
            plan.heatmap(out)
        except OSError as err:  # an unwritable image path is the user's to fix, not a bug
            print(f"error: cannot write heatmap {out}: {err}", file=sys.stderr)
            return 2
        print(f"heatmap written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
