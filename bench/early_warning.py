"""Does the depth trace warn before a DPO run fails? A labeled suite of small CPU runs.

Each run trains a tiny Llama with DPO on the synthetic task (``spinal_callback.preference_data``)
in a plain PyTorch loop, probes the depth trace every ``--probe-every`` steps into a
``RampMonitor``, evaluates held-out preference accuracy at the same cadence, and records the DPO
logs (loss, rewards/margins, rewards/accuracies) every step.

Conditions (several seeds each):
    stable         lr 3e-3, beta 0.1
    stable_slow    lr 1e-3, beta 0.1
    lr_too_high    lr 0.3 (AdamW), beta 0.1
    beta_near_zero beta 1e-4
    labels_flipped chosen and rejected swapped from the middle of the run on
    overflow       from the middle of the run on, gradients pass through fp16 under a loss scale
                   that doubles every step with no overflow check, until they overflow

Failure step, from outcomes only: the first step with a non-finite loss or evaluation, or the
first of two consecutive evaluations with held-out accuracy below 0.6 after the run had reached
0.85 (64 held-out pairs; one noisy evaluation does not make a failure).
Detectors: the SPINAL monitor (first critical alert; and first warning), a loss-spike detector
and a rewards/margins + accuracies drop detector on the DPO logs. For each: detection rate on
failing runs (alert at or before the failure step), false alarms on stable runs, lead time.

    python bench/early_warning.py              # the whole suite, a few minutes on 2 cores
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from recipes.lightning_dpo import collate_pairs, response_logps
from spinal_callback import ProbeBatch, SpinalConfig, SpinalProbe
from spinal_callback.detector import RampMonitor
from spinal_callback.preference_data import tokenizer_corpus, train_eval_split
from spinal_callback.tiny import build_tiny_model, build_tiny_tokenizer

LEARNED = 0.85
COLLAPSED = 0.6


@dataclass(frozen=True)
class Condition:
    name: str
    failing: bool
    learning_rate: float = 3e-3
    beta: float = 0.1
    flip_at: float | None = None
    overflow_at: float | None = None


CONDITIONS = (
    Condition("stable", failing=False),
    Condition("stable_slow", failing=False, learning_rate=1e-3),
    Condition("lr_too_high", failing=True, learning_rate=0.3),
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
    evals: list[tuple[int, float]] = field(default_factory=list)
    alerts: list[dict[str, Any]] = field(default_factory=list)
    failure_step: int | None = None


def dpo_step(
    model: torch.nn.Module, reference: torch.nn.Module, batch: dict[str, torch.Tensor], beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    rewards = []
    for side in ("chosen", "rejected"):
        args = (batch[f"{side}_ids"], batch[f"{side}_attention"], batch[f"{side}_response"])
        with torch.no_grad():
            ref = response_logps(reference, *args)
        rewards.append(beta * (response_logps(model, *args) - ref))
    loss = -torch.nn.functional.logsigmoid(rewards[0] - rewards[1]).mean()
    return loss, (rewards[0] - rewards[1]).detach()


def held_out_accuracy(
    model: torch.nn.Module, reference: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> float:
    model.eval()
    with torch.no_grad():
        _, margins = dpo_step(model, reference, batch, beta=1.0)
    model.train()
    if not torch.isfinite(margins).all():
        return float("nan")
    return float((margins > 0).float().mean())


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
    monitor = RampMonitor(SpinalConfig())
    record = RunRecord(condition.name, seed, condition.failing, steps)
    flip_step = int(condition.flip_at * steps) if condition.flip_at else None
    overflow_step = int(condition.overflow_at * steps) if condition.overflow_at else None
    peak = 0.0
    for step, batch in enumerate(loader, start=1):
        if flip_step is not None and step > flip_step:
            batch = swap_sides(batch)
        loss, margins = dpo_step(model, reference, batch, condition.beta)
        record.loss.append(float(loss.detach()))
        record.margins.append(float(margins.mean()))
        record.accuracies.append(float((margins > 0).float().mean()))
        optimizer.zero_grad()
        loss.backward()
        if overflow_step is not None and step > overflow_step:
            # fp16 gradients under a loss scale that doubles every step with no overflow check:
            # scaled values above 65504 become inf, and Adam spreads them into the weights.
            scale = 2.0 ** (step - overflow_step)
            for parameter in model.parameters():
                assert parameter.grad is not None
                parameter.grad.copy_((parameter.grad * scale).half().float() / scale)
        optimizer.step()
        if step % probe_every == 0:
            accuracy = held_out_accuracy(model, reference, eval_batch)
            record.evals.append((step, accuracy))
            peak = max(peak, accuracy) if math.isfinite(accuracy) else peak
            for alert in monitor.update(probe.run(step)):
                record.alerts.append(alert.to_dict())
        if step >= steps:
            break
    record.failure_step = outcome_failure_step(record)
    return record


def outcome_failure_step(record: RunRecord) -> int | None:
    """First non-finite loss, or the first of two consecutive evaluations with held-out
    accuracy below ``COLLAPSED`` after the run had reached ``LEARNED``."""
    failures = [step for step, loss in enumerate(record.loss, start=1) if not math.isfinite(loss)]
    learned = False
    for (step, accuracy), (_, following) in zip(record.evals, record.evals[1:]):
        if not math.isfinite(accuracy):
            failures.append(step)
            break
        learned = learned or accuracy >= LEARNED
        if learned and accuracy < COLLAPSED and not following >= COLLAPSED:
            failures.append(step)
            break
    return min(failures) if failures else None


def first_alert(record: RunRecord, levels: set[str]) -> int | None:
    steps = [a["step"] for a in record.alerts if a["level"] in levels]
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
    "spinal critical": lambda r: first_alert(r, {"critical"}),
    "spinal warning+": lambda r: first_alert(r, {"warning", "critical"}),
    "loss spike": loss_spike_detector,
    "margin/accuracy drop": margin_drop_detector,
}


def score(records: list[RunRecord]) -> dict[str, dict[str, Any]]:
    table = {}
    for name, detector in DETECTORS.items():
        caught, leads, false_alarms, stable = 0, [], 0, 0
        failing = [r for r in records if r.failing and r.failure_step is not None]
        for record in records:
            fired = detector(record)
            if not record.failing:
                stable += 1
                false_alarms += fired is not None
            elif (
                record.failure_step is not None
                and fired is not None
                and fired <= record.failure_step
            ):
                caught += 1
                leads.append(record.failure_step - fired)
        table[name] = {
            "detected": f"{caught}/{len(failing)}",
            "false_alarms": f"{false_alarms}/{stable}",
            "median_lead_steps": statistics.median(leads) if leads else None,
        }
    return table


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--probe-every", type=int, default=5)
    parser.add_argument("--conditions", nargs="+", default=[c.name for c in CONDITIONS])
    parser.add_argument("--out", default="bench/results/early_warning.json")
    args = parser.parse_args()
    # One thread: a tiny model gains nothing from more, and an oversubscribed OpenMP pool on a
    # busy 2-core machine was seen to run 100x slower.
    torch.set_num_threads(1)
    tokenizer = build_tiny_tokenizer(tokenizer_corpus(), vocab_size=320)
    records = []
    started = time.perf_counter()
    for condition in (c for c in CONDITIONS if c.name in args.conditions):
        for seed in args.seeds:
            record = run_one(condition, seed, args.steps, args.probe_every, tokenizer)
            records.append(record)
            fired = {name: detector(record) for name, detector in DETECTORS.items()}
            final = record.evals[-1][1] if record.evals else float("nan")
            print(
                f"{condition.name:15} seed {seed}  failure step {record.failure_step}  "
                f"final held-out acc {final:.2f}  first alerts {fired}",
                flush=True,
            )
    table = score(records)
    print(f"\n{len(records)} runs in {time.perf_counter() - started:.0f} s")
    print(f"{'detector':22}{'detected':>10}{'false alarms':>14}{'median lead':>13}")
    for name, row in table.items():
        lead = "-" if row["median_lead_steps"] is None else f"{row['median_lead_steps']:.0f}"
        print(f"{name:22}{row['detected']:>10}{row['false_alarms']:>14}{lead:>13}")
    output = Path(args.out)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"table": table, "runs": [r.__dict__ for r in records]}, indent=1))


if __name__ == "__main__":
    main()
