"""Do runs that die today finish healthy with ``on_critical="recover"``?

Reruns the early-warning benchmark's runs (``bench/dpo_runs.py``, the same subjects, tasks, seeds
and frameworks) with the callback set to ``stop_on="critical", on_critical="recover"``, and scores
how each run ends. A run *ends healthy* when it trained to its last step (no stop), its last
evaluation is finite, its held-out preference accuracy is within ``ACCURACY_SLACK`` of its
healthy twin's (same subject, task, seed and framework, trained with recovery on too), and its
neutral-text perplexity is below ``PERPLEXITY_LIMIT`` times the reference's (where the reference
has a language to lose). With ``on_critical="stop"`` none of them can: a stopped run never
reaches its last step.

    python -m bench.recovery --split dev --seeds 0 2           # tune the factor here
    python -m bench.recovery --split test                      # then report, untouched
    python -m bench.recovery --split real --seeds 0 1 2        # SmolLM2-135M (make real-model)
    python -m bench.recovery --split real --lora --seeds 0     # SmolLM2-135M with LoRA r=16

Healthy runs with recovery on are compared with the same runs without it: with no recovery in a
run, every evaluation must be equal, bit for bit.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from bench.dpo_runs import RESULTS, RunRecord, RunSpec, Subject
from bench.early_warning import SPLITS, load_records, train_missing

ACCURACY_SLACK = 0.05
PERPLEXITY_LIMIT = 1.3
LR_FAILURES = ("lr_too_high", "warmup_peak", "step_up")
FAILING = (*LR_FAILURES, "overflow")
DEFAULT_CADENCE = 50
"""``SpinalConfig.every_n_steps``: the snapshot's share of a run is stated at this cadence."""


def lora_subject(subject: Subject) -> Subject:
    """The real model trained through LoRA adapters (r=16): LoRA's usual rate as the healthy
    one, and a rate 100x higher as the far-too-high one."""
    name = f"{subject.name}-lora"
    return replace(subject, name=name, learning_rate=2e-4, high_learning_rate=2e-2)


def specs_for(
    split: str,
    conditions: Sequence[str],
    seeds: Sequence[int],
    factor: float,
    max_recoveries: int,
    lora: bool,
    every_rule: bool = False,
) -> tuple[list[RunSpec], list[RunSpec]]:
    """The runs with recovery on (failing conditions and healthy twins), and the healthy runs
    without it."""
    # The real model's recovery runs are those of its "say:" prompts, not of the chat data.
    base = replace(SPLITS[split](), tasks=tuple(t for t in SPLITS[split]().tasks if t != "chat"))
    if lora:
        base = replace(base, subjects=tuple(lora_subject(s) for s in base.subjects))
    plain = base.specs(("healthy",), seeds)
    # The healthy twins keep the default settings: with no recovery in them (the table says
    # so) they are the same runs whatever the factor, and are not trained again.
    twins = [replace(s, recover=True, lora=lora) for s in base.specs(("healthy",), seeds)]
    with_recovery = twins + [
        replace(
            s,
            recover=True,
            recover_factor=factor,
            max_recoveries=max_recoveries,
            lora=lora,
            recover_every_rule=every_rule,
        )
        for s in base.specs(conditions, seeds)
    ]
    plain = [replace(s, lora=lora) for s in plain]
    return with_recovery, plain


def final(record: RunRecord) -> dict[str, float]:
    return record.evals[-1] if record.evals else {"accuracy": math.nan}


def ending(record: RunRecord, twin: RunRecord | None) -> tuple[bool, str]:
    """Whether ``record`` ends healthy, and why not."""
    last = final(record)
    steps = record.spec["subject"]["steps"]
    if record.stopped or record.steps_run < steps:
        return False, f"stopped at step {record.steps_run}"
    if not (math.isfinite(last["accuracy"]) and math.isfinite(last.get("neutral_nll", math.nan))):
        return False, "non-finite at the end"
    reasons = []
    if twin is not None:
        gap = final(twin)["accuracy"] - last["accuracy"]
        if gap > ACCURACY_SLACK:
            reasons.append(f"accuracy {last['accuracy']:.2f} vs twin {final(twin)['accuracy']:.2f}")
    if last.get("has_language", 1.0) and last["perplexity_ratio"] >= PERPLEXITY_LIMIT:
        reasons.append(f"perplexity x{last['perplexity_ratio']:.2f}")
    return not reasons, "; ".join(reasons)


def twin_of(record: RunRecord, twins: dict[str, RunRecord]) -> RunRecord | None:
    """The healthy run of the same subject, task, seed and framework."""
    condition = record.spec["condition"]
    return twins.get(base_key(record.spec["key"]).replace(f"/{condition}-s", "/healthy-s", 1))


def rows_of(records: Sequence[RunRecord]) -> list[dict[str, Any]]:
    twins = {base_key(r.spec["key"]): r for r in records if r.spec["condition"] == "healthy"}
    rows = []
    for record in records:
        twin = twin_of(record, twins)
        healthy, why = ending(record, twin)
        steps = record.spec["subject"]["steps"]
        snapshots = max(1, record.snapshot_count)
        rows.append(
            {
                "key": record.spec["key"],
                "subject": record.spec["subject"]["name"],
                "task": record.spec["task"],
                "condition": record.spec["condition"],
                "framework": record.spec["framework"],
                "ends_healthy": healthy,
                "why_not": why,
                "recoveries": len(record.recoveries),
                "causes": [r["cause"] for r in record.recoveries],
                "steps_lost": sum(r["steps_lost"] for r in record.recoveries),
                "lr_scale": record.recoveries[-1]["lr_scale"] if record.recoveries else 1.0,
                "time_vs_twin": record.seconds / twin.seconds if twin is not None else math.nan,
                "final_accuracy": final(record)["accuracy"],
                "twin_accuracy": final(twin)["accuracy"] if twin is not None else math.nan,
                "final_perplexity_ratio": final(record).get("perplexity_ratio", math.nan),
                "snapshot_share_at_default_cadence": (
                    record.snapshot_seconds / snapshots * (steps / DEFAULT_CADENCE)
                )
                / record.seconds,
                "snapshot_seconds_each": record.snapshot_seconds / snapshots,
                "snapshot_mib": record.snapshot_bytes / 2**20,
                "stop_reason": record.stop_reason,
            }
        )
    return rows


def summary(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| condition | runs | end healthy | recoveries (median) | steps lost (median) | "
        "time vs twin (median) | still failing: why |",
        "|---|---|---|---|---|---|---|",
    ]
    conditions = list(dict.fromkeys(r["condition"] for r in rows))
    groups = [(c, [r for r in rows if r["condition"] == c]) for c in conditions]
    lr = [r for r in rows if r["condition"] in LR_FAILURES]
    if lr:
        groups.append(("learning-rate failures", lr))
    for name, group in groups:
        healthy = sum(r["ends_healthy"] for r in group)
        why = [r["why_not"].split(";")[0] for r in group if not r["ends_healthy"]]
        kinds: dict[str, int] = {}
        for reason in why:
            kind = reason.split(" ")[0] if reason else "?"
            kinds[kind] = kinds.get(kind, 0) + 1
        share = f"{healthy}/{len(group)} ({100 * healthy / len(group):.0f}%)"
        lines.append(
            f"| {name} | {len(group)} | {share} | "
            f"{statistics.median(r['recoveries'] for r in group):g} | "
            f"{statistics.median(r['steps_lost'] for r in group):g} | "
            f"{statistics.median(r['time_vs_twin'] for r in group):.2f}x | "
            + (", ".join(f"{k} {v}" for k, v in sorted(kinds.items())) or "-")
            + " |"
        )
    return "\n".join(lines)


def by_first_cause(rows: Sequence[dict[str, Any]]) -> str:
    """Runs with a recovery, by the rule that triggered the first one: how many ended healthy
    (which rules a gentler step fixes)."""
    causes: dict[str, list[bool]] = {}
    for row in rows:
        if row["causes"]:
            rule = row["causes"][0].split(" ")[-1]
            causes.setdefault(rule, []).append(row["ends_healthy"])
    parts = [f"{rule} {sum(ends)}/{len(ends)}" for rule, ends in sorted(causes.items())]
    return "runs ending healthy, by the rule of their first recovery: " + (
        ", ".join(parts) or "no recovery"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--split", choices=sorted(SPLITS), default="dev")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--conditions", nargs="+", default=list(FAILING))
    parser.add_argument("--factor", type=float, default=0.1, help="recover_lr_factor")
    parser.add_argument("--max-recoveries", type=int, default=3)
    parser.add_argument("--lora", action="store_true", help="LoRA r=16 (the real split)")
    parser.add_argument(
        "--every-rule",
        action="store_true",
        help="recover on every rule, UNRECOVERABLE_RULES too (measures which rules to exclude)",
    )
    parser.add_argument("--rescore", action="store_true", help="score saved runs, train nothing")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", action="store_true", help="print one line per run")
    args = parser.parse_args(argv)
    with_recovery, plain = specs_for(
        args.split,
        args.conditions,
        args.seeds,
        args.factor,
        args.max_recoveries,
        args.lora,
        args.every_rule,
    )
    started = time.perf_counter()
    if not args.rescore:
        train_missing([*with_recovery, *plain], args.jobs, args.threads)
    records = load_records(with_recovery)
    rows = rows_of(records)
    pairs = compare_plain(load_records(plain), records)
    print(
        f"\n{args.split}: {len(records)} runs with recovery scored in "
        f"{time.perf_counter() - started:.0f} s (factor {args.factor}, "
        f"max {args.max_recoveries}{', LoRA' if args.lora else ''})"
    )
    if args.runs:
        for r in rows:
            print(
                f"{r['key']:60} {'healthy' if r['ends_healthy'] else 'FAILED ':8} "
                f"rec={r['recoveries']} lost={r['steps_lost']} acc={r['final_accuracy']:.2f}"
                f"/{r['twin_accuracy']:.2f} ppl={r['final_perplexity_ratio']:.2f} "
                f"{r['why_not']} {r['causes']}"
            )
    print()
    print(summary(rows))
    print(by_first_cause([r for r in rows if r["condition"] != "healthy"]))
    shares = [r["snapshot_share_at_default_cadence"] for r in rows]
    each = [r["snapshot_seconds_each"] for r in rows]
    mib = [r["snapshot_mib"] for r in rows if r["snapshot_mib"] > 0]
    print(
        f"\nsnapshot: {statistics.median(each) * 1e3:.2f} ms each (median), "
        f"{statistics.median(mib) if mib else 0:.1f} MiB host memory per copy (two kept); "
        f"share of a run at every_n_steps={DEFAULT_CADENCE}: median "
        f"{100 * statistics.median(shares):.3f}%, max {100 * max(shares):.3f}%"
    )
    print(
        f"healthy runs without recovery vs with it: {pairs['pairs']} pairs, "
        f"{pairs['no_recovery']} with no recovery, {pairs['identical']} of them identical "
        "at every evaluation"
    )
    tag = f"{args.split}{'-lora' if args.lora else ''}-f{args.factor}-m{args.max_recoveries}"
    tag += "-all" if args.every_rule else ""
    out = RESULTS / f"recovery-{tag}.json"
    out.write_text(json.dumps({"rows": rows, "plain_vs_recover": pairs}, indent=1))
    return 0


def compare_plain(plain: Sequence[RunRecord], recovered: Sequence[RunRecord]) -> dict[str, int]:
    """Healthy runs without recovery against the same runs with it: with no recovery in the
    run, every evaluation must be equal, bit for bit."""
    by_base = {base_key(r.spec["key"]): r for r in recovered if r.spec["condition"] == "healthy"}
    result = {"pairs": 0, "no_recovery": 0, "identical": 0}
    for record in plain:
        other = by_base.get(base_key(record.spec["key"]))
        if other is None:
            continue
        result["pairs"] += 1
        if other.recoveries:
            continue
        result["no_recovery"] += 1
        same = [(e["accuracy"], e["neutral_nll"]) for e in record.evals] == [
            (e["accuracy"], e["neutral_nll"]) for e in other.evals
        ]
        result["identical"] += int(same)
    return result


def base_key(key: str) -> str:
    """A run's key without its recovery settings."""
    return key.split("-recover")[0]


if __name__ == "__main__":
    raise SystemExit(main())
