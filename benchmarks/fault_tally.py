"""Count the fault-injection suite's cases per file and outcome: a reproducible tally for reports.

    python -m benchmarks.fault_tally                  # run every fault file, then print the tally
    python -m benchmarks.fault_tally --collect-only   # count the cases without running them
    python -m benchmarks.fault_tally -- -x -k server  # more pytest arguments after --

The fault files are ``tests/*/test_*faults*.py`` (``test_faults*.py``, ``test_data_faults.py``,
``test_server_faults.py``). Each case asserts a clear error of the project's kinds or a correct handling, so
"passed" counts those; "failed" and "error" are cases that gave a silent wrong answer, a traceback of another
kind or a crash. Outcomes come from pytest's own reports (a plugin object), one per case: a case that fails
in setup or teardown counts once, as "error". Exit status: pytest's.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PATTERN = "tests/*/test_*faults*.py"
OUTCOMES = ("passed", "failed", "error", "skipped")


class Tally:
    """A pytest plugin: the collected cases and each one's outcome, per file."""

    def __init__(self):
        self.collected: Counter[str] = Counter()
        self.outcomes: dict[str, str] = {}

    def pytest_collection_modifyitems(self, items):
        for item in items:
            self.collected[item.nodeid.split("::")[0]] += 1

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or report.outcome != "passed":  # setup/teardown count only when they fail or skip
            outcome = "error" if report.outcome == "failed" and report.when != "call" else report.outcome
            if self.outcomes.get(report.nodeid) in (None, "passed"):
                self.outcomes[report.nodeid] = outcome

    def table(self) -> str:
        by_file: dict[str, Counter[str]] = defaultdict(Counter)
        for nodeid, outcome in self.outcomes.items():
            by_file[nodeid.split("::")[0]][outcome] += 1
        header = f"{'file':<44} {'cases':>6} " + " ".join(f"{o:>7}" for o in OUTCOMES)
        lines = [header, "-" * len(header)]
        for path in sorted(self.collected):
            counts = by_file[path]
            lines.append(f"{path:<44} {self.collected[path]:>6} " + " ".join(f"{counts[o]:>7}" for o in OUTCOMES))
        total = Counter(self.outcomes.values())
        lines += ["-" * len(header), f"{'total':<44} {sum(self.collected.values()):>6} "
                  + " ".join(f"{total[o]:>7}" for o in OUTCOMES)]
        return "\n".join(lines)


def fault_files() -> list[str]:
    return sorted(str(path.relative_to(ROOT)) for path in ROOT.glob(PATTERN))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--collect-only", action="store_true", help="count the cases without running them")
    parser.add_argument("pytest_args", nargs="*", help="more pytest arguments (after --)")
    args = parser.parse_args(argv)
    tally = Tally()
    options = ["-q", "-p", "no:cacheprovider", "--rootdir", str(ROOT)]
    if args.collect_only:
        options.append("--collect-only")
    start = time.perf_counter()
    status = pytest.main([*options, *args.pytest_args, *(str(ROOT / f) for f in fault_files())], plugins=[tally])
    wall = time.perf_counter() - start
    print()
    print(tally.table())
    if not args.collect_only:
        print(f"wall time {wall:.0f} s")
    return int(status)


if __name__ == "__main__":
    sys.exit(main())
