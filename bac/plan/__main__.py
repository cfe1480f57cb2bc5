"""``python -m bac.plan show PLAN.json [--heatmap OUT.png]``: summary and blocks-by-steps heatmap."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import Plan


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bac.plan", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    show = commands.add_parser("show", help="print a plan's summary and draw its heatmap")
    show.add_argument("plan", type=Path)
    show.add_argument("--heatmap", type=Path, help="image path (default: next to the plan, .png)")
    show.add_argument("--no-heatmap", action="store_true", help="print the summary only")
    args = parser.parse_args(argv)

    try:
        plan = Plan.load(args.plan)
    except (OSError, ValueError) as err:
        print(f"error: cannot read plan {args.plan}: {err}", file=sys.stderr)
        return 2
    print(plan.summary())
    if not args.no_heatmap:
        out = args.heatmap or args.plan.with_suffix(".png")
        plan.heatmap(out)
        print(f"heatmap written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
