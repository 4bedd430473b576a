"""Do the warnings come before failures that build up slowly, and how quiet are long healthy runs?

The slow conditions of ``dpo_runs.SLOW_CONDITIONS`` damage a run over hundreds of steps:
``over_optimisation`` (64 pairs for many epochs, 5x the healthy rate, beta 0.02),
``slow_ramp`` (the rate rising linearly from healthy to far too high over the run),
``rising_noise`` (label noise rising from 0 to 60%) and ``length_bias`` (the chosen reply gets
a tail of repeated words that grows to 12). They run twice the subject's length with outcomes
every 2 steps, so a lead is not rounded to the probe interval (``every_n_steps=10``). The
failure step comes from the outcomes only (``early_warning.failure_step``).

Per failing run this reports the first step at which the callback warned (any rule at warning
or critical) and went critical, the first warning-level step of every rule on its own, and the
two baselines that read the DPO logs; per condition, which signal moved first. The long healthy
runs (``dpo_runs.LONG_CONDITIONS``, 4x the length) report alerts per 1,000 steps and the neutral
perplexity at the end.

    python -m bench.slow_failures --split dev --seeds 0 2      # tune here
    python -m bench.slow_failures --split test                 # report
    python -m bench.slow_failures --split test --long          # long healthy runs
    python -m bench.slow_failures --split real --tasks chat    # SmolLM2 on chat data
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from typing import Any

from bench.dpo_runs import CONDITIONS, LONG_CONDITIONS, RESULTS, SLOW_CONDITIONS, RunRecord
from bench.early_warning import (
    BASELINES,
    SPLITS,
    WARNING_PLUS,
    first_spinal,
    label,
    load_records,
    loss_spike_baseline,
    margin_drop_baseline,
    spinal_alerts,
    train_missing,
)
from spinal_callback.config import SpinalConfig
from spinal_callback.monitor.rules import DEFAULT_RULES

RULES = tuple(rule.name for rule in DEFAULT_RULES)
SIGNAL_RULES = (
    "trace_departure",
    "language_drift",
    "task_collapse",
    "preference_reversal",
    "loss_spike",
    "non_finite",
)
"""The rules in the per-condition table, the depth trace's first."""
WARNING = "spinal, warning+"
CRITICAL = "spinal, critical"
CRITICAL_LEVEL = frozenset({"critical"})


def first_steps(record: RunRecord, config: SpinalConfig) -> dict[str, int | None]:
    """First step of each signal: the callback's first warning and first critical, each rule's
    first warning-or-critical on its own, and the two baselines."""
    alerts = [a for a in spinal_alerts(record, config) if a.level in WARNING_PLUS]
    steps: dict[str, int | None] = {
        WARNING: min((a.step for a in alerts), default=None),
        CRITICAL: first_spinal(record, CRITICAL_LEVEL, config),
    }
    for rule in RULES:
        steps[rule] = min((a.step for a in alerts if a.rule == rule), default=None)
    steps[BASELINES[0]] = loss_spike_baseline(record)
    steps[BASELINES[1]] = margin_drop_baseline(record)
    return steps


def lead(failure: int, step: int | None) -> int | None:
    """Steps by which ``step`` came before ``failure`` (0: at it); ``None``: silent or late."""
    return None if step is None or step > failure else failure - step


def score_slow(records: Sequence[RunRecord], config: SpinalConfig) -> list[dict[str, Any]]:
    """One row per run of a failing condition: its failure step and every signal's first step."""
    failures = label(records)
    rows = []
    for record in records:
        spec = record.spec
        if not CONDITIONS[spec["condition"]].failing:
            continue
        rows.append(
            {
                "key": spec["key"],
                "subject": spec["subject"]["name"],
                "task": spec["task"],
                "condition": spec["condition"],
                "failure_step": failures[spec["key"]],
                "steps": record.steps_run,
                "first": first_steps(record, config),
            }
        )
    return rows


def summarise(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The targets over the runs that failed: warned strictly before the failure step, the
    median warning lead (over the warned runs, and over all with a miss as 0), critical by the
    failure step; the same leads for each rule and baseline."""
    failed = [r for r in rows if r["failure_step"] is not None]
    summary: dict[str, Any] = {"runs": len(rows), "failed": len(failed)}
    for signal in (WARNING, CRITICAL, *RULES, *BASELINES):
        leads = [lead(r["failure_step"], r["first"][signal]) for r in failed]
        early = [x for x in leads if x is not None and (signal == CRITICAL or x > 0)]
        summary[signal] = {
            "in_time": len(early),
            "median_lead": statistics.median(early) if early else None,
            "median_lead_all": statistics.median([x or 0 for x in leads]) if leads else None,
        }
    return summary


def markdown_slow(rows: Sequence[dict[str, Any]]) -> str:
    """The per-condition table for the docs: runs failed, then per signal the runs it warned
    strictly before the failure step (critical: by it) and the median lead of those."""
    signals = (WARNING, CRITICAL, *SIGNAL_RULES[:3], *BASELINES)
    header = ["condition", "failed", "failure step (median)", *signals]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    conditions = list(dict.fromkeys(r["condition"] for r in rows))
    for condition in [*conditions, "all"]:
        group = [r for r in rows if condition in ("all", r["condition"])]
        summary = summarise(group)
        failed = [r["failure_step"] for r in group if r["failure_step"] is not None]
        cells = []
        for signal in signals:
            part = summary[signal]
            lead = "" if part["median_lead"] is None else f", lead {part['median_lead']:g}"
            cells.append(f"{part['in_time']}/{summary['failed']}{lead}")
        at = f"{statistics.median(failed):g}" if failed else "-"
        lines.append(
            f"| {condition} | {len(failed)}/{len(group)} | {at} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def markdown_cells(rows: Sequence[dict[str, Any]]) -> str:
    """One row per model x task x condition: runs failed, then per signal the runs it warned in
    time (critical: by the failure step) and their median lead."""
    signals = (WARNING, CRITICAL, *BASELINES)
    header = ["model", "task", "condition", "failed", *signals]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    cells: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for row in rows:
        cells.setdefault((row["subject"], row["task"], row["condition"]), []).append(row)
    for (subject, task, condition), group in cells.items():
        summary = summarise(group)
        parts = []
        for signal in signals:
            part = summary[signal]
            lead = "" if part["median_lead"] is None else f", lead {part['median_lead']:g}"
            parts.append(f"{part['in_time']}/{summary['failed']}{lead}")
        failed = f"{summary['failed']}/{len(group)}"
        lines.append("| " + " | ".join([subject, task, condition, failed, *parts]) + " |")
    return "\n".join(lines)


def print_slow(rows: Sequence[dict[str, Any]]) -> None:
    """Per condition: runs failed, median failure step, then per signal runs in time and the
    median lead (critical counts at the failure step; the others must come before it)."""
    signals = (WARNING, CRITICAL, *SIGNAL_RULES, *BASELINES)
    short = {
        WARNING: "warn",
        CRITICAL: "crit",
        "trace_departure": "departure",
        "language_drift": "perplexity",
        "task_collapse": "collapse",
        "preference_reversal": "reversal",
        "loss_spike": "loss_spike",
        "non_finite": "non_finite",
        BASELINES[0]: "base:loss",
        BASELINES[1]: "base:margins",
    }
    conditions = dict.fromkeys(r["condition"] for r in rows)
    print(
        f"\n{'condition':18}{'failed':>9}{'fail@':>7}  "
        + "".join(f"{short[s]:>17}" for s in signals)
    )
    for condition in [*conditions, "all"]:
        group = [r for r in rows if condition in ("all", r["condition"])]
        summary = summarise(group)
        failed = [r["failure_step"] for r in group if r["failure_step"] is not None]
        at = f"{statistics.median(failed):g}" if failed else "-"
        cells = []
        for signal in signals:
            part = summary[signal]
            median = "-" if part["median_lead"] is None else f"{part['median_lead']:g}"
            cells.append(f"{part['in_time']:>3}/{summary['failed']:<3} lead {median:>4}")
        print(
            f"{condition:18}{summary['failed']:>4}/{len(group):<4}{at:>7}  "
            + "".join(f"{c:>17}" for c in cells)
        )


def healthy_rows(records: Sequence[RunRecord], config: SpinalConfig) -> list[dict[str, Any]]:
    """One row per run of a healthy setting: steps, warnings and criticals, the neutral
    perplexity multiple at the last evaluation, and whether the outcome called it failed."""
    failures = label(records)
    rows = []
    for record in records:
        if CONDITIONS[record.spec["condition"]].failing:
            continue
        alerts = spinal_alerts(record, config)
        last = record.evals[-1]
        rows.append(
            {
                "key": record.spec["key"],
                "subject": record.spec["subject"]["name"],
                "condition": record.spec["condition"],
                "steps": record.steps_run,
                "warnings": sum(a.level == "warning" for a in alerts),
                "criticals": sum(a.level == "critical" for a in alerts),
                "rules": sorted({f"{a.rule}:{a.level}" for a in alerts if a.level != "info"}),
                "end_perplexity_ratio": (
                    last["perplexity_ratio"] if last.get("has_language", 1.0) else None
                ),
                "end_accuracy": last["accuracy"],
                "failure_step": failures[record.spec["key"]],
                "baselines": {
                    BASELINES[0]: loss_spike_baseline(record),
                    BASELINES[1]: margin_drop_baseline(record),
                },
            }
        )
    return rows


def ratio(value: float | None) -> str:
    """A perplexity multiple, or ``n/a`` for a reference with no language to lose."""
    return "n/a" if value is None else f"{value:.3f}"


def print_healthy(rows: Sequence[dict[str, Any]]) -> None:
    print(f"\n{'healthy run':52}{'steps':>6}{'warn':>6}{'crit':>6}{'ppl x':>8}{'acc':>6}  rules")
    for r in rows:
        print(
            f"{r['key']:52}{r['steps']:>6}{r['warnings']:>6}{r['criticals']:>6}"
            f"{ratio(r['end_perplexity_ratio']):>8}{r['end_accuracy']:>6.2f}  "
            + ",".join(r["rules"])
        )
    steps = sum(r["steps"] for r in rows)
    if steps:
        print(
            f"{len(rows)} runs, {steps} steps (longest {max(r['steps'] for r in rows)}): "
            f"{1000 * sum(r['warnings'] for r in rows) / steps:.2f} warnings and "
            f"{1000 * sum(r['criticals'] for r in rows) / steps:.2f} critical alerts per 1,000 "
            f"steps; runs with a critical: {sum(r['criticals'] > 0 for r in rows)}/{len(rows)}; "
            f"baselines fired on: "
            + ", ".join(
                f"{name} {sum(r['baselines'][name] is not None for r in rows)}/{len(rows)}"
                for name in BASELINES
            )
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--split", choices=sorted(SPLITS), default="dev")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--long", action="store_true", help="the long healthy runs instead")
    parser.add_argument("--lora", action="store_true", help="LoRA (r=16) runs")
    parser.add_argument("--subjects", nargs="+", default=None, help="only these subjects")
    parser.add_argument("--tasks", nargs="+", default=None, help="only these tasks")
    parser.add_argument("--markdown", action="store_true", help="print the docs' table too")
    parser.add_argument("--conditions", nargs="+", default=None)
    parser.add_argument("--rescore", action="store_true", help="score saved runs, train nothing")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE")
    args = parser.parse_args(argv)
    config = SpinalConfig().with_overrides(
        **{k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
    )
    split = SPLITS[args.split]()
    default = LONG_CONDITIONS if args.long else ("healthy", *SLOW_CONDITIONS)
    specs = split.specs(args.conditions or default, args.seeds, lora=args.lora)
    if args.subjects:
        specs = [spec for spec in specs if spec.subject.name in args.subjects]
    if args.tasks:
        specs = [spec for spec in specs if spec.task in args.tasks]
    started = time.perf_counter()
    if not args.rescore:
        train_missing(specs, args.jobs, args.threads)
    records = load_records(specs)
    print(f"\n{args.split}: {len(records)} runs scored in {time.perf_counter() - started:.0f} s")
    failing, healthy = score_slow(records, config), healthy_rows(records, config)
    if failing:
        print_slow(failing)
        if args.markdown:
            print("\n" + markdown_slow(failing) + "\n\n" + markdown_cells(failing))
    print_healthy(healthy)
    name = "long" if args.long else "slow"
    out = RESULTS / f"{name}-{args.split}{'-lora' if args.lora else ''}.json"
    out.write_text(json.dumps({"failing": failing, "healthy": healthy}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
