"""``bac-plan show PLAN.json [--heatmap OUT.png]``: summary and blocks-by-steps heatmap.

Any :class:`bac.BacError` (a missing, truncated, malformed or too deeply nested plan file, an image format
matplotlib does not write) and an image path that cannot be written are one line on stderr and exit
status 2. A plan of more than ``bac.plan.HEATMAP_COLUMNS`` steps is drawn in bins of steps.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bac.apps.common import debug_requested
from bac.errors import BacError
from bac.plan import Plan


def _refused(message: str) -> int:
    print("error: " + " ".join(message.split()), file=sys.stderr)
    return 2


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
        return _refused(f"cannot read plan: {err}")
    print(plan.summary())
    if not args.no_heatmap:
        out = args.heatmap or args.plan.with_suffix(".png")
        try:
            plan.heatmap(out)
        except BacError as err:
            if debug_requested():
                raise
            return _refused(str(err))
        except OSError as err:  # an unwritable image path is the user's to fix, not a bug
            return _refused(f"cannot write heatmap {out}: {err}")
        print(f"heatmap written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
