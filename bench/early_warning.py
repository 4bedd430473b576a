"""Does the depth trace warn before a DPO run fails? A labeled suite of small CPU runs.

Each run trains a tiny Llama (4 blocks, width 64) with DPO on the synthetic task
(``spinal_callback.preference_data``) in a plain PyTorch loop for ``--steps`` steps, batch 16.
It probes the depth trace at step 0 and every ``--probe-every`` steps, evaluates 64 held-out
pairs at the same cadence, and records the DPO logs (loss, rewards/margins, rewards/accuracies)
every step. The recorded runs are saved (``--runs``) so the detectors can be re-scored without
training (``--rescore``).

Conditions (several seeds each):
    stable         lr 3e-3, beta 0.1
    stable_slow    lr 1e-3, beta 0.1
    lr_too_high    lr warmed up linearly from 3e-3 to 0.1 over the run (a peak far too high)
    beta_near_zero beta 1e-4
    labels_flipped chosen and rejected swapped from the middle of the run on
    overflow       from the middle of the run on, gradients pass through fp16 under a loss scale
                   that doubles every step with no overflow check, until they overflow

Failure step, from outcomes only: the first non-finite training loss or evaluation; else the
first of two consecutive evaluations with held-out accuracy below 0.6 after the run had reached
0.85, or with the held-out chosen reply's log-prob more than 1 nat per token below the
reference's. A run labeled failing that never fails by this definition is reported, not scored.
Detectors, each replayed on the recorded runs: the SPINAL monitor (``RampMonitor`` with the
default ``SpinalConfig``) on the traces alone and on the traces plus the DPO logs, each at its
first critical alert and at its first warning; a loss-spike detector and a rewards/margins +
accuracies drop detector on the DPO logs. For each: detection rate on failing runs (alert at or
before the failure step), false alarms on stable runs, median lead (failure step minus alert).

    python bench/early_warning.py                         # 30 runs, about 3 minutes on 2 cores
    python bench/early_warning.py --seeds 5 6 7 8 9       # seeds the defaults were not tuned on
    python bench/early_warning.py --rescore               # re-score the saved runs
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import multiprocessing
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from spinal_callback import ProbeBatch, SpinalConfig, SpinalProbe
from spinal_callback.detector import RampMonitor
from spinal_callback.events import Alert
from spinal_callback.pairs import collate_pairs, reply_logp_shifts
from spinal_callback.preference_data import TOKENIZER_VOCAB_SIZE, tokenizer_corpus, train_eval_split
from spinal_callback.tiny import build_tiny_model, build_tiny_tokenizer

LEARNED = 0.85
COLLAPSED = 0.6
CHOSEN_COLLAPSE = 1.0
WARNING_PLUS = frozenset({"warning", "critical"})


@dataclass(frozen=True)
class Condition:
    name: str
    failing: bool
    learning_rate: float = 3e-3
    peak_learning_rate: float | None = None
    beta: float = 0.1
    flip_at: float | None = None
    overflow_at: float | None = None

    def learning_rate_at(self, step: int, steps: int) -> float:
        """Constant, or a linear warm-up from ``learning_rate`` to ``peak_learning_rate``."""
        if self.peak_learning_rate is None:
            return self.learning_rate
        return self.learning_rate + (self.peak_learning_rate - self.learning_rate) * step / steps


CONDITIONS = (
    Condition("stable", failing=False),
    Condition("stable_slow", failing=False, learning_rate=1e-3),
    Condition("lr_too_high", failing=True, peak_learning_rate=0.1),
    Condition("beta_near_zero", failing=True, beta=1e-4),
    Condition("labels_flipped", failing=True, flip_at=0.5),
    Condition("overflow", failing=True, overflow_at=0.5),
)


@dataclass
class RunRecord:
    condition: str
    seed: int
    failing: bool
    steps: int
    loss: list[float] = field(default_factory=list)
    margins: list[float] = field(default_factory=list)
    accuracies: list[float] = field(default_factory=list)
    logps_chosen: list[float] = field(default_factory=list)
    evals: list[tuple[int, float, float]] = field(default_factory=list)
    traces: list[Any] = field(default_factory=list)
    alerts: list[dict[str, Any]] = field(default_factory=list)
    failure_step: int | None = None


@dataclass
class StepOutputs:
    loss: torch.Tensor
    margins: torch.Tensor
    chosen_shift: torch.Tensor
    """Per pair, mean per-token log-prob of the chosen reply, policy minus reference (nats)."""


def dpo_step(
    model: torch.nn.Module, reference: torch.nn.Module, batch: dict[str, torch.Tensor], beta: float
) -> StepOutputs:
    chosen, rejected = reply_logp_shifts(model, reference, batch)
    margins = beta * (chosen - rejected)
    tokens = batch["chosen_response"][:, 1:].sum(dim=-1).clamp_min(1)
    return StepOutputs(
        loss=-torch.nn.functional.logsigmoid(margins).mean(),
        margins=margins.detach(),
        chosen_shift=chosen.detach() / tokens,
    )


def evaluate(
    model: torch.nn.Module, reference: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[float, float]:
    """Held-out preference accuracy and mean chosen log-prob shift per token (nats)."""
    model.eval()
    with torch.no_grad():
        outputs = dpo_step(model, reference, batch, beta=1.0)
    model.train()
    if not (torch.isfinite(outputs.margins).all() and torch.isfinite(outputs.chosen_shift).all()):
        return float("nan"), float("nan")
    return float((outputs.margins > 0).float().mean()), float(outputs.chosen_shift.mean())


def swap_sides(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    swapped = {}
    for key, value in batch.items():
        side, rest = key.split("_", 1)
        swapped[f"{'rejected' if side == 'chosen' else 'chosen'}_{rest}"] = value
    return swapped


def run_one(
    condition: Condition, seed: int, steps: int, probe_every: int, tokenizer: Any
) -> RunRecord:
    torch.manual_seed(seed)
    model = build_tiny_model(
        "llama", vocab_size=len(tokenizer), hidden=64, layers=4, seed=seed
    ).train()
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    train, held_out = train_eval_split(train_count=steps * 16, eval_count=64, seed=seed)
    collate = partial(collate_pairs, tokenizer)
    loader = DataLoader(list(train), batch_size=16, shuffle=True, collate_fn=collate,
                        generator=torch.Generator().manual_seed(seed))  # fmt: skip
    eval_batch = collate(list(held_out))
    optimizer = torch.optim.AdamW(model.parameters(), lr=condition.learning_rate)
    probe = SpinalProbe(
        model, ProbeBatch.from_texts(tokenizer, held_out["prompt"][:32]), SpinalConfig()
    )
    record = RunRecord(condition.name, seed, condition.failing, steps)
    record.traces.append(probe.run(0))
    flip_step = int(condition.flip_at * steps) if condition.flip_at else None
    overflow_step = int(condition.overflow_at * steps) if condition.overflow_at else None
    for step, batch in enumerate(loader, start=1):
        if flip_step is not None and step > flip_step:
            batch = swap_sides(batch)
        for group in optimizer.param_groups:
            group["lr"] = condition.learning_rate_at(step, steps)
        outputs = dpo_step(model, reference, batch, condition.beta)
        record.loss.append(float(outputs.loss.detach()))
        record.margins.append(float(outputs.margins.mean()))
        record.accuracies.append(float((outputs.margins > 0).float().mean()))
        record.logps_chosen.append(float(outputs.chosen_shift.mean()))
        optimizer.zero_grad()
        outputs.loss.backward()
        if overflow_step is not None and step > overflow_step:
            # fp16 gradients under a loss scale that doubles every step with no overflow check:
            # scaled values above 65504 become inf, and Adam spreads them into the weights.
            scale = 2.0 ** (step - overflow_step)
            for parameter in model.parameters():
                assert parameter.grad is not None
                parameter.grad.copy_((parameter.grad * scale).half().float() / scale)
        optimizer.step()
        if step % probe_every == 0:
            record.evals.append((step, *evaluate(model, reference, eval_batch)))
            record.traces.append(probe.run(step))
        if step >= steps:
            break
    record.failure_step = outcome_failure_step(record)
    return record


def outcome_failure_step(record: RunRecord) -> int | None:
    """The first non-finite training loss or evaluation; else the first of two consecutive
    evaluations where held-out accuracy is below ``COLLAPSED`` after the run had reached
    ``LEARNED``, or where the held-out chosen reply's log-prob has fallen more than
    ``CHOSEN_COLLAPSE`` nats per token below the reference's."""
    for step, loss in enumerate(record.loss, start=1):
        if not math.isfinite(loss):
            return step
    learned = False
    for (step, accuracy, shift), (_, next_accuracy, next_shift) in pairwise(record.evals):
        if not (math.isfinite(accuracy) and math.isfinite(shift)):
            return step
        learned = learned or accuracy >= LEARNED
        if learned and accuracy < COLLAPSED and not next_accuracy >= COLLAPSED:
            return step
        if shift < -CHOSEN_COLLAPSE and not next_shift >= -CHOSEN_COLLAPSE:
            return step
    return None


def replay(record: RunRecord, config: SpinalConfig, with_logs: bool) -> list[Alert]:
    """The alerts a fresh ``RampMonitor`` raises on the run's traces (and, ``with_logs``, on its
    per-step DPO logs, fed first at each step as the callbacks do)."""
    monitor = RampMonitor(config)
    traces = {trace.step: trace for trace in record.traces}
    alerts: list[Alert] = []
    if 0 in traces:
        alerts += monitor.update(traces[0])
    for step, loss in enumerate(record.loss, start=1):
        if with_logs:
            logs = {"loss": loss, "rewards/margins": record.margins[step - 1],
                    "rewards/accuracies": record.accuracies[step - 1]}  # fmt: skip
            alerts += monitor.update_logs(step, logs)
        if step in traces:
            alerts += monitor.update(traces[step])
    return alerts


def first_alert(
    record: RunRecord, levels: set[str], with_logs: bool, config: SpinalConfig | None = None
) -> int | None:
    """First step at which the SPINAL monitor raises an alert at one of ``levels``."""
    alerts = replay(record, config or SpinalConfig(), with_logs)
    steps = [alert.step for alert in alerts if alert.level in levels]
    return min(steps) if steps else None


def loss_spike_detector(record: RunRecord, window: int = 20, threshold: float = 6.0) -> int | None:
    """First step whose loss is non-finite or exceeds median + threshold * MAD of the window."""
    for step, loss in enumerate(record.loss, start=1):
        if not math.isfinite(loss):
            return step
        history = [x for x in record.loss[max(0, step - 1 - window) : step - 1] if math.isfinite(x)]
        if len(history) >= window:
            median = statistics.median(history)
            mad = statistics.median(abs(x - median) for x in history) * 1.4826
            if loss > median + threshold * max(mad, 1e-3):
                return step
    return None


def margin_drop_detector(record: RunRecord, window: int = 20, drop: float = 0.3) -> int | None:
    """First step where the windowed rewards/accuracies falls ``drop`` below its running peak,
    or the windowed rewards/margins turns negative after having been positive."""
    peak_accuracy, margin_was_positive = 0.0, False
    for step in range(window, len(record.accuracies) + 1):
        accuracy = statistics.fmean(record.accuracies[step - window : step])
        margin = statistics.fmean(record.margins[step - window : step])
        if not (math.isfinite(accuracy) and math.isfinite(margin)):
            return step
        peak_accuracy = max(peak_accuracy, accuracy)
        margin_was_positive = margin_was_positive or margin > 0.5
        if peak_accuracy - accuracy > drop or (margin_was_positive and margin < 0):
            return step
    return None


DETECTORS: dict[str, Callable[[RunRecord], int | None]] = {
    "spinal trace, critical": partial(first_alert, levels={"critical"}, with_logs=False),
    "spinal trace, warning+": partial(first_alert, levels=WARNING_PLUS, with_logs=False),
    "spinal trace+logs, critical": partial(first_alert, levels={"critical"}, with_logs=True),
    "spinal trace+logs, warning+": partial(first_alert, levels=WARNING_PLUS, with_logs=True),
    "loss spike": loss_spike_detector,
    "margin/accuracy drop": margin_drop_detector,
}


def _caught_and_leads(
    records: list[RunRecord], detector: Callable[[RunRecord], int | None]
) -> tuple[int, int, list[int]]:
    """Failing runs (with a failure step), those the detector caught by then, and the leads."""
    failing = [r for r in records if r.failing and r.failure_step is not None]
    leads = []
    for record in failing:
        fired = detector(record)
        assert record.failure_step is not None
        if fired is not None and fired <= record.failure_step:
            leads.append(record.failure_step - fired)
    return len(failing), len(leads), leads


def score(records: list[RunRecord]) -> dict[str, dict[str, Any]]:
    table = {}
    stable = [r for r in records if not r.failing]
    conditions = sorted({r.condition for r in records if r.failing}, key=records_order(records))
    for name, detector in DETECTORS.items():
        total, caught, leads = _caught_and_leads(records, detector)
        by_condition = {}
        for condition in conditions:
            subset = [r for r in records if r.condition == condition]
            n, k, condition_leads = _caught_and_leads(subset, detector)
            by_condition[condition] = {
                "detected": f"{k}/{n}",
                "median_lead_steps": statistics.median(condition_leads)
                if condition_leads
                else None,
            }
        table[name] = {
            "detected": f"{caught}/{total}",
            "false_alarms": f"{sum(detector(r) is not None for r in stable)}/{len(stable)}",
            "median_lead_steps": statistics.median(leads) if leads else None,
            "by_condition": by_condition,
        }
    return table


def records_order(records: list[RunRecord]) -> Callable[[str], int]:
    order = list(dict.fromkeys(r.condition for r in records))
    return order.index


def print_tables(table: dict[str, dict[str, Any]]) -> None:
    def lead(value: float | None) -> str:
        return "-" if value is None else f"{value:g}"

    print(f"{'detector':30}{'detected':>10}{'false alarms':>14}{'median lead':>13}")
    for name, row in table.items():
        print(
            f"{name:30}{row['detected']:>10}{row['false_alarms']:>14}"
            f"{lead(row['median_lead_steps']):>13}"
        )
    conditions = list(next(iter(table.values()))["by_condition"])
    print(f"\nper failing condition: detected, median lead\n{'detector':30}", end="")
    print("".join(f"{c:>18}" for c in conditions))
    for name, row in table.items():
        cells = [
            f"{cell['detected']}, {lead(cell['median_lead_steps'])}"
            for cell in row["by_condition"].values()
        ]
        print(f"{name:30}" + "".join(f"{c:>18}" for c in cells))


def _run_job(job: tuple[Condition, int, int, int]) -> RunRecord:
    # One thread per run: a tiny model gains nothing from more, and an oversubscribed OpenMP
    # pool on a busy 2-core machine was seen to run 100x slower.
    torch.set_num_threads(1)
    condition, seed, steps, probe_every = job
    tokenizer = build_tiny_tokenizer(tokenizer_corpus(), vocab_size=TOKENIZER_VOCAB_SIZE)
    return run_one(condition, seed, steps, probe_every, tokenizer)


def train_suite(args: argparse.Namespace) -> list[RunRecord]:
    jobs = [
        (condition, seed, args.steps, args.probe_every)
        for condition in CONDITIONS
        if condition.name in args.conditions
        for seed in args.seeds
    ]
    context = multiprocessing.get_context("fork")
    with context.Pool(args.workers) as pool:
        records = []
        for record in pool.imap(_run_job, jobs):
            final = record.evals[-1][1] if record.evals else float("nan")
            print(
                f"{record.condition:15} seed {record.seed}  failure step {record.failure_step}"
                f"  final held-out acc {final:.2f}",
                flush=True,
            )
            records.append(record)
    return records


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--probe-every", type=int, default=5)
    parser.add_argument("--conditions", nargs="+", default=[c.name for c in CONDITIONS])
    parser.add_argument("--workers", type=int, default=2, help="runs trained in parallel")
    parser.add_argument("--out", default="bench/results/early_warning.json")
    parser.add_argument(
        "--runs",
        default="bench/results/early_warning_runs.pt",
        help="where the recorded runs (logs, evaluations, traces) are saved",
    )
    parser.add_argument(
        "--rescore", action="store_true", help="score the runs saved at --runs, train nothing"
    )
    args = parser.parse_args()
    started = time.perf_counter()
    runs_path = Path(args.runs)
    if args.rescore:
        records = torch.load(runs_path, weights_only=False)
    else:
        records = train_suite(args)
        runs_path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(records, runs_path)
    rows = []
    for record in records:
        fired = {name: detector(record) for name, detector in DETECTORS.items()}
        rows.append({"condition": record.condition, "seed": record.seed,
                     "failure_step": record.failure_step, "first_alerts": fired})  # fmt: skip
        print(f"{record.condition:15} seed {record.seed}  failure {record.failure_step}  {fired}")
    table = score(records)
    print(f"\n{len(records)} runs in {time.perf_counter() - started:.0f} s")
    print_tables(table)
    output = Path(args.out)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"table": table, "runs": rows}, indent=1))


if __name__ == "__main__":
    main()
