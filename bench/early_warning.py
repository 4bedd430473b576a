"""Does the monitor warn before a DPO run fails, on models, tasks and faults it was not tuned on?

Trains labeled DPO runs (``bench/dpo_runs.py``: TRL's ``DPOTrainer`` with its real
``logging_steps``, and the Lightning recipe), each with the callback attached and never stopping,
and records everything the monitor received. Then replays the monitor (and two baselines that
read the same DPO logs) on every run and scores them against outcome-defined failure steps.

Splits (chosen before any tuning; the defaults of ``SpinalConfig`` were set on ``dev`` only):
    dev    llama-4, gpt2-6 and the demo's random-initialised llama-4 x tasks repeat, copy
           (tuned on seeds 0 and 2: ``--split dev --seeds 0 2``)
    test   gpt_neox-6, phi3-4, gemma2-8 x tasks reverse, lengths
    test-random  random-initialised gpt_neox-6 and phi3-4 (settings of the demo's) x tasks
           repeat, lengths: the held-out check of the rule for models with no language
    real   SmolLM2-135M-Instruct (``make real-model``) x task repeat (the recipe's "say:"
           prompts), and x task chat (``bench/chat_data.py``, its own settings)
Every subject x task runs the sudden conditions of ``dpo_runs.SUDDEN_CONDITIONS`` with seeds 0
and 1 through TRL and seed 2 through Lightning (the slow ones: ``bench/slow_failures.py``).

Failure step, from outcomes only (held-out evaluation every 10 steps; every 2 in slow runs). An
outcome must hold at every evaluation for ``PERSIST_STEPS`` (two evaluations in a row at the
10-step cadence):
    - a non-finite evaluation or logged loss/reward;
    - held-out preference accuracy below ``COLLAPSED`` after it had reached ``LEARNED``; or never
      above ``COLLAPSED`` in a run whose healthy twin (same subject, task, seed and framework)
      reached ``LEARNED``: then the failure step is the step the twin got there;
    - the language breaking: perplexity of held-out neutral text (of the task's domain, never seen
      by the probe) above ``PERPLEXITY_MULTIPLE`` times the reference's; it applies where the
      reference has a language to lose (its neutral-text NLL below half of ln V; not the demo's
      random-initialised model). A falling chosen log-prob is not a failure (likelihood
      displacement);
    - where the condition biases length: greedy replies to held-out prompts ``LENGTH_MULTIPLE``
      times as long as the reference's.

    python bench/early_warning.py --split dev            # train what is missing, then score
    python bench/early_warning.py --split test --rescore # score the saved runs only
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from bench.dpo_runs import (
    RESULTS,
    SUDDEN_CONDITIONS,
    RunRecord,
    RunSpec,
    Subject,
    prepare_base,
)
from recipes.common import cadence
from spinal_callback.config import SpinalConfig
from spinal_callback.monitor.ramp_monitor import RampMonitor
from spinal_callback.probe.trace import DepthTrace

LEARNED = 0.7
COLLAPSED = 0.6
PERPLEXITY_MULTIPLE = 2.0
PERSIST_STEPS = 10
LENGTH_MULTIPLE = 2.0
"""Greedy replies to held-out prompts twice as long as the reference's (measured where the
condition biases length): the model learned to ramble instead of the task."""
"""How long an outcome must hold to be a failure: one evaluation interval of the sudden runs."""
SEED_FRAMEWORKS = {0: "trl", 1: "trl", 2: "lightning"}
HEALTHY = ("healthy", "healthy_slow")


@dataclass(frozen=True)
class Split:
    name: str
    subjects: tuple[Subject, ...]
    tasks: tuple[str, ...]

    def specs(
        self, conditions: Iterable[str], seeds: Iterable[int], lora: bool = False
    ) -> list[RunSpec]:
        return [
            RunSpec(subject, task, condition, seed, SEED_FRAMEWORKS[seed % 3], lora=lora)
            for subject in self.subjects
            for task in self.tasks
            if not subject.only_tasks or task in subject.only_tasks
            for condition in conditions
            for seed in seeds
        ]


def random_init_subject(name: str, architecture: str, layers: int) -> Subject:
    """A tiny random-initialised model at the demo's settings (lr 3e-3, far too high 9e-2,
    beta 0.2): no language to lose, so only the log rules and ``task_collapse`` watch it."""
    return Subject(
        name,
        architecture,
        layers=layers,
        learning_rate=3e-3,
        high_learning_rate=9e-2,
        beta=0.2,
        pretrain=False,
    )


def real_subject() -> Subject:
    from recipes.smollm2 import checkpoint_dir

    return Subject(
        "smollm2-135m",
        "checkpoint",
        learning_rate=3e-5,
        high_learning_rate=3e-3,
        path=str(checkpoint_dir()),
        steps=60,
        batch_size=4,
        only_tasks=("repeat",),
    )


def real_chat_subject() -> Subject:
    """SmolLM2 on the chat data (``bench/chat_data.py``): healthy full fine-tuning at 1e-5
    (``healthy_slow``: 3e-6), LoRA at 10x, far too high at 1e-3; batch 2, 30 steps, pairs of
    64-96 tokens, outcomes at most every 6 steps (a 2-core CPU's budget)."""
    from recipes.smollm2 import checkpoint_dir

    return Subject(
        "smollm2-135m-chat",
        "checkpoint",
        learning_rate=1e-5,
        high_learning_rate=1e-3,
        path=str(checkpoint_dir()),
        steps=30,
        batch_size=2,
        eval_floor=6,
        lora_rate_scale=10.0,
        max_length=256,
        only_tasks=("chat",),
    )


SPLITS: dict[str, Callable[[], Split]] = {
    "dev": lambda: Split(
        "dev",
        (
            Subject("llama-4", "llama", layers=4),
            Subject("gpt2-6", "gpt2", layers=6),
            random_init_subject("demo-llama-4", "llama", 4),
        ),
        ("repeat", "copy"),
    ),
    "test": lambda: Split(
        "test",
        (
            Subject("gpt_neox-6", "gpt_neox", layers=6),
            Subject("phi3-4", "phi3", layers=4),
            Subject("gemma2-8", "gemma2", layers=8),
        ),
        ("reverse", "lengths"),
    ),
    "test-random": lambda: Split(
        "test-random",
        tuple(
            random_init_subject(f"random-{architecture}-{layers}", architecture, layers)
            for architecture, layers in (("gpt_neox", 6), ("phi3", 4))
        ),
        ("repeat", "lengths"),
    ),
    "real": lambda: Split("real", (real_subject(), real_chat_subject()), ("repeat", "chat")),
}


# ---- running ------------------------------------------------------------------------------


def record_path(spec: RunSpec) -> Path:
    return RESULTS / "runs" / f"{spec.key}.json"


def train_one(spec: RunSpec, threads: int) -> str:
    import logging

    import torch

    from bench.dpo_runs import run

    logging.disable(logging.WARNING)
    torch.set_num_threads(threads)
    path = record_path(spec)
    record = run(spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".partial").write_text(record.to_json())
    path.with_suffix(".partial").replace(path)
    return f"{spec.key} {record.steps_run} steps {record.seconds:.0f} s"


def train_missing(specs: Sequence[RunSpec], jobs: int, threads: int) -> None:
    missing = [spec for spec in specs if not record_path(spec).is_file()]
    print(f"{len(specs) - len(missing)} runs saved, {len(missing)} to train", flush=True)
    # The pretrained bases are built once per architecture and seed, before the pool starts.
    for subject, seed in dict.fromkeys((spec.subject, spec.seed) for spec in missing):
        prepare_base(subject, seed)
    context = multiprocessing.get_context("spawn")
    with context.Pool(jobs, maxtasksperchild=8) as pool:
        for line in pool.imap_unordered(partial(train_one, threads=threads), missing):
            print(line, flush=True)


def load_records(specs: Sequence[RunSpec]) -> list[RunRecord]:
    return [
        RunRecord.from_json(record_path(spec).read_text())
        for spec in specs
        if record_path(spec).is_file()
    ]


# ---- outcomes -----------------------------------------------------------------------------


def learned_step(record: RunRecord) -> int | None:
    """First evaluation at which held-out accuracy reached ``LEARNED``."""
    for evaluation in record.evals:
        if evaluation["accuracy"] >= LEARNED:
            return int(evaluation["step"])
    return None


def persistent_from(
    evals: Sequence[dict[str, float]], holds: Callable[[dict[str, float]], bool]
) -> int | None:
    """First evaluation step from which ``holds`` is true at every evaluation of the next
    ``PERSIST_STEPS`` steps, with an evaluation at least ``PERSIST_STEPS`` later (at the
    benchmark's 10-step cadence: two evaluations in a row; at a 2-step cadence: six)."""
    steps = [int(e["step"]) for e in evals]
    for start in steps:
        window = [
            e
            for e, step in zip(evals, steps, strict=True)
            if start <= step <= start + PERSIST_STEPS
        ]
        if steps[-1] >= start + PERSIST_STEPS and all(holds(e) for e in window):
            return start
    return None


def failure_step(record: RunRecord, twin_learned: int | None) -> int | None:
    """The outcome-defined failure step (module docstring), or ``None``."""
    candidates = []
    for event in record.events:
        if event["kind"] == "logs" and not all(
            math.isfinite(v)
            for k, v in event["logs"].items()
            if k in ("loss", "train/loss") or k.startswith("rewards/")
        ):
            candidates.append(event["step"])
            break
    evals = record.evals
    for evaluation in evals:
        if not (math.isfinite(evaluation["accuracy"]) and math.isfinite(evaluation["neutral_nll"])):
            candidates.append(int(evaluation["step"]))
            break
    learned_at = learned_step(record)
    if learned_at is not None:
        after = [e for e in evals if e["step"] >= learned_at]
        collapsed = persistent_from(after, lambda e: e["accuracy"] < COLLAPSED)
        if collapsed is not None:
            candidates.append(collapsed)
    if evals and evals[0].get("has_language", 1.0):
        broken = persistent_from(evals, lambda e: e["perplexity_ratio"] > PERPLEXITY_MULTIPLE)
        if broken is not None:
            candidates.append(broken)
    if evals and "length_ratio" in evals[0]:
        rambling = persistent_from(evals, lambda e: e["length_ratio"] > LENGTH_MULTIPLE)
        if rambling is not None:
            candidates.append(rambling)
    finite_accuracy = [e["accuracy"] for e in evals if math.isfinite(e["accuracy"])]
    if twin_learned is not None and max(finite_accuracy, default=0.0) <= COLLAPSED:
        candidates.append(twin_learned)
    return min(candidates) if candidates else None


def twin_key(record: RunRecord) -> str:
    """The key of the run's healthy twin (same subject, task, seed, framework and cadence)."""
    spec = record.spec
    key = f"{spec['subject']['name']}/{spec['task']}/healthy-s{spec['seed']}-{spec['framework']}"
    if spec.get("probe_every") == "auto":
        key += f"-auto-b{spec.get('overhead_budget', 0.01):g}"
    return key


def label(records: Sequence[RunRecord]) -> dict[str, int | None]:
    """Failure step of every run, keyed by its ``RunSpec.key``."""
    by_key = {r.spec["key"]: r for r in records}
    steps = {}
    for record in records:
        twin = by_key.get(twin_key(record))
        twin_learned = learned_step(twin) if twin is not None and record.spec["failing"] else None
        steps[record.spec["key"]] = failure_step(record, twin_learned)
    return steps


# ---- detectors ----------------------------------------------------------------------------


TRACE_RULES = frozenset({"non_finite", "language_drift", "trace_departure", "task_collapse"})
LOG_RULES = frozenset({"non_finite", "preference_reversal", "loss_spike"})


def spinal_alerts(record: RunRecord, config: SpinalConfig) -> list[Any]:
    """The alerts a fresh ``RampMonitor`` raises on the run's recorded inputs, in order."""
    monitor = RampMonitor(config)
    if record.reference is not None:
        monitor.set_reference(DepthTrace.from_dict(record.reference))
    alerts: list[Any] = []
    for event in record.events:
        if event["kind"] == "trace":
            alerts += monitor.update(DepthTrace.from_dict(event["trace"]))
        else:
            alerts += monitor.update_logs(event["step"], event["logs"])
    return alerts


def first_spinal(
    record: RunRecord,
    levels: frozenset[str],
    config: SpinalConfig,
    rules: frozenset[str] | None = None,
) -> int | None:
    steps = [
        a.step
        for a in spinal_alerts(record, config)
        if a.level in levels and (rules is None or a.rule in rules)
    ]
    return min(steps) if steps else None


def logged(record: RunRecord, *keys: str) -> list[tuple[int, float]]:
    """``(step, value)`` of the first of ``keys`` present in each log."""
    series = []
    for event in record.events:
        if event["kind"] != "logs":
            continue
        value = next((event["logs"][k] for k in keys if k in event["logs"]), None)
        if value is not None:
            series.append((event["step"], value))
    return series


def loss_spike_baseline(record: RunRecord, window: int = 10, z: float = 4.0) -> int | None:
    """A non-finite loss, or a loss ``z`` robust sigmas above the median of the previous
    ``window`` logged losses (at least 3)."""
    series = logged(record, "loss", "train/loss")
    for index, (step, loss) in enumerate(series):
        if not math.isfinite(loss):
            return step
        history = [v for _, v in series[max(0, index - window) : index] if math.isfinite(v)]
        if len(history) >= 3:
            median = statistics.median(history)
            sigma = 1.4826 * statistics.median(abs(v - median) for v in history)
            if loss > median + z * max(sigma, 0.01):
                return step
    return None


def margin_drop_baseline(record: RunRecord, drop: float = 0.3) -> int | None:
    """``rewards/accuracies`` ``drop`` below its running peak, ``rewards/margins`` negative after
    having been positive, or either non-finite."""
    accuracies = dict(logged(record, "rewards/accuracies"))
    margins = dict(logged(record, "rewards/margins"))
    peak, positive = 0.0, False
    for step in sorted(set(accuracies) | set(margins)):
        accuracy, margin = accuracies.get(step, peak), margins.get(step, 0.0)
        if not (math.isfinite(accuracy) and math.isfinite(margin)):
            return step
        peak = max(peak, accuracy)
        positive = positive or margin > 0
        if peak - accuracy >= drop or (positive and margin < 0):
            return step
    return None


CRITICAL = frozenset({"critical"})
WARNING_PLUS = frozenset({"warning", "critical"})


def detectors(config: SpinalConfig) -> dict[str, Callable[[RunRecord], int | None]]:
    return {
        "spinal, critical": partial(first_spinal, levels=CRITICAL, config=config),
        "spinal, warning+": partial(first_spinal, levels=WARNING_PLUS, config=config),
        "spinal trace rules, critical": partial(
            first_spinal, levels=CRITICAL, config=config, rules=TRACE_RULES
        ),
        "spinal log rules, critical": partial(
            first_spinal, levels=CRITICAL, config=config, rules=LOG_RULES
        ),
        "loss spike (logs)": loss_spike_baseline,
        "margins/accuracies drop (logs)": margin_drop_baseline,
    }


# ---- scoring ------------------------------------------------------------------------------


def lead(row: dict[str, Any], detector: str) -> int | None:
    """Steps from ``detector``'s first alert to the run's failure; ``None`` when the run did not
    fail, or the detector was silent or late."""
    failure, alert = row["failure_step"], row["first_alert"][detector]
    if failure is None or alert is None or alert > failure:
        return None
    return int(failure - alert)


def score(
    records: Sequence[RunRecord], config: SpinalConfig
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Per detector: failing runs caught by their failure step, leads, false alarms on healthy
    runs; and one row per run."""
    failures = label(records)
    fired = {
        name: {r.spec["key"]: detect(r) for r in records}
        for name, detect in detectors(config).items()
    }
    rows = []
    for record in records:
        key = record.spec["key"]
        rows.append(
            {
                "key": key,
                "subject": record.spec["subject"]["name"],
                "task": record.spec["task"],
                "condition": record.spec["condition"],
                "framework": record.spec["framework"],
                "intended_failing": record.spec["failing"],
                "failure_step": failures[key],
                "first_alert": {name: fired[name][key] for name in fired},
            }
        )
    table = {}
    for name in fired:
        failing = [row for row in rows if row["failure_step"] is not None]
        healthy = [
            row for row in rows if not row["intended_failing"] and row["failure_step"] is None
        ]
        leads = [lead(row, name) for row in failing if lead(row, name) is not None]
        table[name] = {
            "caught": len(leads),
            "failing": len(failing),
            "false_alarms": sum(row["first_alert"][name] is not None for row in healthy),
            "healthy": len(healthy),
            "median_lead": statistics.median(leads) if leads else None,
            "missed": [row["key"] for row in failing if lead(row, name) is None],
        }
    return table, rows


def print_summary(table: dict[str, Any]) -> None:
    print(f"\n{'detector':34}{'caught':>10}{'false alarms':>14}{'median lead':>13}")
    for name, row in table.items():
        lead = "-" if row["median_lead"] is None else f"{row['median_lead']:g}"
        print(
            f"{name:34}{row['caught']:>5}/{row['failing']:<4}"
            f"{row['false_alarms']:>8}/{row['healthy']:<5}{lead:>13}"
        )


def print_cells(rows: Sequence[dict[str, Any]], detector: str) -> None:
    """One line per subject x task x condition: failures, caught, leads, baselines' leads."""
    cells: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for row in rows:
        cells.setdefault((row["subject"], row["task"], row["condition"]), []).append(row)
    print(f"\n{'subject':14}{'task':9}{'condition':16}{'failed':>7}  {detector} / baselines")
    for (subject, task, condition), group in cells.items():
        failed = [r for r in group if r["failure_step"] is not None]
        parts = []
        for r in group:
            alerts = r["first_alert"]
            parts.append(
                f"f={r['failure_step']} s={alerts[detector]} "
                f"b={alerts['loss spike (logs)']},{alerts['margins/accuracies drop (logs)']}"
            )
        print(
            f"{subject:14}{task:9}{condition:16}{len(failed):>3}/{len(group):<3}  "
            + " | ".join(parts)
        )


BASELINES = ("loss spike (logs)", "margins/accuracies drop (logs)")


HEADERS = {"subject": "model"}


def markdown_table(
    rows: Sequence[dict[str, Any]],
    detector: str,
    columns: tuple[str, ...],
    cell: Callable[[list[int], int, int, int], str],
    failed_label: str = "failed",
) -> str:
    """One Markdown row per distinct value of ``columns``: how many runs failed, and per detector
    ``cell(leads, failed, alerted, unfailed)``, where ``leads`` are the steps by which it caught
    failures in time and ``alerted`` counts the runs that did not fail but got an alert."""
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row[column] for column in columns), []).append(row)
    names = (detector, *BASELINES)
    header = [HEADERS.get(c, c) for c in columns] + [failed_label, *names]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for values, group in groups.items():
        failed = [r for r in group if r["failure_step"] is not None]
        quiet = [r for r in group if r["failure_step"] is None]
        parts = []
        for name in names:
            leads = [lead(r, name) for r in failed if lead(r, name) is not None]
            alarms = sum(r["first_alert"][name] is not None for r in quiet)
            parts.append(cell(leads, len(failed), alarms, len(quiet)))  # type: ignore[arg-type]
        lines.append("| " + " | ".join([*values, f"{len(failed)}/{len(group)}", *parts]) + " |")
    return "\n".join(lines)


def _cell_text(leads: list[int], failed: int, alarms: int, quiet: int) -> str:
    text = []
    if failed:
        median = f" (lead {statistics.median(leads):g})" if leads else ""
        text.append(f"caught {len(leads)}/{failed}{median}")
    if quiet:
        text.append(f"alerted {alarms}/{quiet} unfailed")
    return "; ".join(text)


def _condition_text(leads: list[int], failed: int, alarms: int, quiet: int) -> str:
    text = f"{len(leads)}/{failed}" if failed else "-"
    if leads:
        text += f", lead {statistics.median(leads):g}"
    if quiet:
        text += f"; alerted {alarms}/{quiet} unfailed"
    return text


def markdown_cells(rows: Sequence[dict[str, Any]], detector: str) -> str:
    """One row per subject x task x condition (the README's details table)."""
    return markdown_table(rows, detector, ("subject", "task", "condition"), _cell_text)


def markdown_conditions(rows: Sequence[dict[str, Any]], detector: str) -> str:
    """The per-cell table summed over models and tasks: one row per condition."""
    return markdown_table(rows, detector, ("condition",), _condition_text, "runs failed")


def healthy_profile(records: Sequence[RunRecord]) -> list[dict[str, Any]]:
    """Per subject, what its healthy runs' traces did (README "what healthy looks like"): the
    task trace's contraction range and contraction slope (reference -> last probe), lens entropy
    of the last late block (reference -> last probe), and the largest neutral departure and
    neutral perplexity multiple seen."""
    from spinal_callback.outputs.tensorboard import health_scalars

    by_subject: dict[str, list[RunRecord]] = {}
    for record in records:
        if record.spec["condition"] in HEALTHY and record.reference is not None:
            by_subject.setdefault(record.spec["subject"]["name"], []).append(record)
    rows = []
    for subject, group in by_subject.items():
        contraction, slopes, entropy, departures, ratios = [], [], [], [], []
        for record in group:
            assert record.reference is not None
            reference = DepthTrace.from_dict(record.reference)
            traces = [
                DepthTrace.from_dict(e["trace"]) for e in record.events if e["kind"] == "trace"
            ]
            last = traces[-1]
            contraction += [*reference.contraction.tolist(), *last.contraction.tolist()]
            slopes.append(
                (reference.summary["contraction_slope"], last.summary["contraction_slope"])
            )
            entropy.append((reference.summary["lens_entropy"], last.summary["lens_entropy"]))
            health = [health_scalars(t, reference) for t in traces]
            departures += [h.get("spinal/neutral/departure", math.nan) for h in health]
            ratios += [h.get("spinal/neutral/perplexity_ratio", math.nan) for h in health]
        rows.append(
            {
                "subject": subject,
                "runs": len(group),
                "contraction": (min(contraction), max(contraction)),
                "slope_start": statistics.median(a for a, _ in slopes),
                "slope_end": statistics.median(b for _, b in slopes),
                "slope_sign_flips": sum((a > 0) != (b > 0) for a, b in slopes),
                "entropy_start": statistics.median(a for a, _ in entropy),
                "entropy_end": statistics.median(b for _, b in entropy),
                "max_departure": max(d for d in departures if math.isfinite(d)),
                "max_perplexity_ratio": max(r for r in ratios if math.isfinite(r)),
            }
        )
    return rows


def print_profile(rows: Sequence[dict[str, Any]]) -> None:
    print(
        f"\n{'healthy runs':16}{'n':>3} {'contraction':>13} {'slope ref->end':>16} "
        f"{'flips':>6} {'entropy ref->end':>17} {'max depart':>11} {'max ppl x':>10}"
    )
    for r in rows:
        low, high = r["contraction"]
        print(
            f"{r['subject']:16}{r['runs']:>3} {low:>6.2f}-{high:<6.2f} "
            f"{r['slope_start']:>+7.2f}->{r['slope_end']:<+7.2f} {r['slope_sign_flips']:>6} "
            f"{r['entropy_start']:>8.2f}->{r['entropy_end']:<7.2f} {r['max_departure']:>11.3f} "
            f"{r['max_perplexity_ratio']:>10.3f}"
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--split", choices=sorted(SPLITS), default="dev")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--conditions", nargs="+", default=list(SUDDEN_CONDITIONS))
    parser.add_argument("--rescore", action="store_true", help="score saved runs, train nothing")
    parser.add_argument("--subjects", nargs="+", default=None, help="only these subjects")
    parser.add_argument("--jobs", type=int, default=2, help="runs trained in parallel")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--cells", action="store_true", help="print every cell's runs")
    parser.add_argument(
        "--every-n-steps",
        type=cadence,
        default=10,
        help="the callback's cadence in the runs: an int, or 'auto' (with --budget)",
    )
    parser.add_argument("--budget", type=float, default=0.01, help="overhead_budget for 'auto'")
    parser.add_argument("--markdown", action="store_true", help="print the per-cell table")
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="FIELD=VALUE",
        help="score with these SpinalConfig overrides (values as JSON), e.g. patience=1",
    )
    args = parser.parse_args(argv)
    config = SpinalConfig().with_overrides(
        **{k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
    )
    split = SPLITS[args.split]()
    specs = split.specs(args.conditions, args.seeds)
    if args.subjects:
        specs = [spec for spec in specs if spec.subject.name in args.subjects]
    specs = [
        dataclasses.replace(spec, probe_every=args.every_n_steps, overhead_budget=args.budget)
        for spec in specs
    ]
    started = time.perf_counter()
    if not args.rescore:
        train_missing(specs, args.jobs, args.threads)
    records = load_records(specs)
    table, rows = score(records, config)
    print(f"\n{args.split}: {len(records)} runs scored in {time.perf_counter() - started:.0f} s")
    if args.cells:
        print_cells(rows, "spinal, critical")
    if args.markdown:
        print(markdown_conditions(rows, "spinal, critical"))
        print()
        print(markdown_cells(rows, "spinal, critical"))
    print_summary(table)
    profile = healthy_profile(records)
    print_profile(profile)
    cadence_tail = (
        "" if args.every_n_steps == 10 else f"-every-{args.every_n_steps}-b{args.budget:g}"
    )
    out = RESULTS / f"{args.split}{cadence_tail}.json"
    out.write_text(json.dumps({"table": table, "runs": rows, "healthy_profile": profile}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
