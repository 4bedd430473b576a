"""Does the automatic cadence keep what the fixed one catches, or only see it later?

Reads two scored runs of ``bench/early_warning.py`` on the same split and seeds: the fixed
cadence (``{split}.json``, every 10 steps) and the automatic one
(``{split}-every-auto-b{budget}.json``), joined run by run. The training of a run does not
depend on when it is probed, so the two share every failure step (checked: a run whose
failure step differs is reported). For each detector it prints the catches and false alarms
under both, and sorts every catch the automatic cadence lost:

    seen at its next probe   the automatic run alerted at its first probe at or after the step
                             the fixed run alerted: the rules saw the failure as soon as they
                             looked, and the interval alone made it late
    later                    it alerted, after a probe that did not
    never                    it did not alert

A lost catch "seen at its next probe" says nothing against the rules' calibration under a
changing interval; "later" and "never" do.

    python -m bench.cadence_compare --split test --budget 0.01
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.dpo_runs import RESULTS, RunRecord
from bench.early_warning import lead

DETECTORS = ("spinal, critical", "spinal, warning+")
AUTO_TAIL = "-auto-b{budget:g}"
LOST_KINDS = ("seen at its next probe", "later", "never")
CALIBRATION_STEP = 10
"""The benchmark's ``auto_min_steps``: the calibration probe's step, after which the budget
sets the interval."""


def scored(path: Path) -> dict[str, dict[str, Any]]:
    """The rows of a scored split, by run key."""
    if not path.is_file():
        raise SystemExit(f"{path} is missing: run bench/early_warning.py for it first")
    return {row["key"]: row for row in json.loads(path.read_text())["runs"]}


def probe_steps(key: str) -> tuple[list[int], int]:
    """The steps at which a saved run was probed (its recorded traces), and its last step (the
    end of training is always probed)."""
    record = RunRecord.from_json((RESULTS / "runs" / f"{key}.json").read_text())
    steps = [int(e["trace"]["step"]) for e in record.events if e["kind"] == "trace"]
    return steps, record.steps_run


def caught(row: dict[str, Any], detector: str) -> bool:
    """Whether ``detector`` alerted by the run's failure step (``early_warning.lead``)."""
    return lead(row, detector) is not None


def false_alarm(row: dict[str, Any], detector: str) -> bool:
    healthy = not row["intended_failing"] and row["failure_step"] is None
    return healthy and row["first_alert"][detector] is not None


def lost_kind(
    fixed: dict[str, Any], auto: dict[str, Any], steps: Sequence[int], detector: str
) -> str:
    """How the automatic run missed a catch the fixed one made (see the module's doc)."""
    alert = auto["first_alert"][detector]
    if alert is None:
        return "never"
    after = [s for s in steps if s >= fixed["first_alert"][detector]]
    return "seen at its next probe" if after and alert <= after[0] else "later"


def compare(split: str, budget: float) -> dict[str, Any]:
    """The comparison as JSON types (see the module's doc)."""
    fixed = scored(RESULTS / f"{split}.json")
    auto = scored(RESULTS / f"{split}-every-auto-b{budget:g}.json")
    tail = AUTO_TAIL.format(budget=budget)
    pairs = [
        (fixed[key.removesuffix(tail)], row)
        for key, row in auto.items()
        if key.endswith(tail) and key.removesuffix(tail) in fixed
    ]
    probed = {a["key"]: probe_steps(a["key"]) for _, a in pairs}
    steps_of = {key: steps for key, (steps, _) in probed.items()}
    intervals = [
        later - earlier
        for steps, last in probed.values()
        for earlier, later in itertools.pairwise(steps)
        if earlier >= CALIBRATION_STEP and later != last
    ]
    result: dict[str, Any] = {
        "runs": len(pairs),
        "failure_steps_differ": [
            a["key"] for f, a in pairs if f["failure_step"] != a["failure_step"]
        ],
        "interval": {
            "median": statistics.median(intervals) if intervals else None,
            "min": min(intervals, default=None),
            "max": max(intervals, default=None),
        },
    }
    for detector in DETECTORS:
        lost = [
            {
                "key": a["key"],
                "kind": lost_kind(f, a, steps_of[a["key"]], detector),
                "fixed_alert": f["first_alert"][detector],
                "auto_alert": a["first_alert"][detector],
                "failure_step": a["failure_step"],
            }
            for f, a in pairs
            if caught(f, detector) and not caught(a, detector)
        ]
        result[detector] = {
            "failing": sum(a["failure_step"] is not None for _, a in pairs),
            "healthy": sum(
                not a["intended_failing"] and a["failure_step"] is None for _, a in pairs
            ),
            "caught_fixed": sum(caught(f, detector) for f, _ in pairs),
            "caught_auto": sum(caught(a, detector) for _, a in pairs),
            "false_alarms_fixed": sum(false_alarm(f, detector) for f, _ in pairs),
            "false_alarms_auto": sum(false_alarm(a, detector) for _, a in pairs),
            "gained": [
                a["key"] for f, a in pairs if caught(a, detector) and not caught(f, detector)
            ],
            "lost": lost,
        }
    return result


def print_comparison(result: dict[str, Any]) -> None:
    interval = result["interval"]
    print(
        f"{result['runs']} runs; automatic interval after calibration (the end-of-run probe "
        f"aside): median "
        f"{interval['median']}, {interval['min']}-{interval['max']} steps; failure steps that "
        f"differ: {len(result['failure_steps_differ'])}"
    )
    for detector in DETECTORS:
        row = result[detector]
        kinds = [lost["kind"] for lost in row["lost"]]
        print(
            f"{detector:18} caught {row['caught_fixed']}/{row['failing']} fixed, "
            f"{row['caught_auto']}/{row['failing']} auto; false alarms "
            f"{row['false_alarms_fixed']}/{row['healthy']} fixed, "
            f"{row['false_alarms_auto']}/{row['healthy']} auto; gained {len(row['gained'])}; "
            f"lost {len(kinds)}: " + ", ".join(f"{kinds.count(kind)} {kind}" for kind in LOST_KINDS)
        )
        for lost in row["lost"]:
            print(
                f"    {lost['key']}: {lost['kind']} (failure {lost['failure_step']}, fixed alert "
                f"{lost['fixed_alert']}, auto alert {lost['auto_alert']})"
            )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--split", default="test")
    parser.add_argument("--budget", type=float, default=0.01)
    args = parser.parse_args(argv)
    result = compare(args.split, args.budget)
    print_comparison(result)
    out = RESULTS / f"{args.split}-cadence-b{args.budget:g}.json"
    out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
