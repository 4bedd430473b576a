"""The robustness totals: bad inputs handled clearly, and faults survived with nothing lost.

Every case is a test in ``tests/`` marked ``bad_input`` (refused before the first training step,
with an error that names the offending argument) or ``fault`` (a broken disk, a kill and a resume,
a second run in the same folder, a checkpoint naming someone else's file, ...: training goes on
or stops cleanly, and no record or file of the user's is lost). This runs them all and prints,
per marker, how many were tried and how many held, and the ones that did not.

    PYTHONPATH=. python bench/robustness.py
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARKERS = ("bad_input", "fault")


class Tally:
    """Outcome of every marked test item: held (passed), failed, or skipped (not tried here)."""

    def __init__(self) -> None:
        self.outcomes: dict[str, dict[str, str]] = defaultdict(dict)
        self._markers: dict[str, list[str]] = {}

    def pytest_collection_modifyitems(self, items: list[Any]) -> None:
        for item in items:
            self._markers[item.nodeid] = [m for m in MARKERS if item.get_closest_marker(m)]

    def pytest_runtest_logreport(self, report: Any) -> None:
        markers = self._markers.get(report.nodeid, [])
        if report.when == "call" or report.outcome != "passed":
            outcome = "skipped" if report.skipped else report.outcome
            for marker in markers:
                if self.outcomes[marker].get(report.nodeid) not in ("failed",):
                    self.outcomes[marker][report.nodeid] = outcome


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--verbose", action="store_true", help="list every case")
    args = parser.parse_args(argv)
    tally = Tally()
    pytest.main(
        ["-q", "-p", "no:cacheprovider", "-m", " or ".join(MARKERS), str(ROOT / "tests")],
        plugins=[tally],
    )
    print()
    print(f"{'kind':<12} {'tried':>6} {'held':>6} {'failed':>7} {'skipped':>8}")
    worst = 0
    for marker in MARKERS:
        outcomes = tally.outcomes[marker]
        counts = {
            kind: sum(1 for o in outcomes.values() if o == kind)
            for kind in ("passed", "failed", "skipped")
        }
        tried = counts["passed"] + counts["failed"]
        print(
            f"{marker:<12} {tried:>6} {counts['passed']:>6} {counts['failed']:>7} "
            f"{counts['skipped']:>8}"
        )
        for nodeid, outcome in sorted(outcomes.items()):
            if outcome == "failed" or args.verbose:
                print(f"  {outcome:<8} {nodeid}")
        worst = max(worst, counts["failed"])
    return 1 if worst else 0


if __name__ == "__main__":
    sys.exit(main())
