"""Training overhead of SpinalTrainerCallback at the default cadence, in one process.

Runs the same TRL DPO run (tiny Llama, synthetic preference pairs, same seed) alternately without
and with the callback, several times, and reports the median steps/s and the peak memory of both.

    python bench/overhead.py                     # CPU, tiny model
    python bench/overhead.py --preset llama-1b   # CUDA, Llama-3.2-1B-shaped, bf16
    python -m bench.overhead --model DIR --steps 100 --batch-size 4 --repeats 1 --warmup 0
                                                 # a real checkpoint (its own tokenizer)
    python -m bench.overhead --model DIR --pairs long ...   # pairs of realistic length
    python -m bench.overhead --every-n-steps auto ...       # the cadence set by a 1% budget
    python -m bench.overhead --every-n-steps auto --budget 0.02 --auto-max-steps 1000 ...

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` during the run; on the CPU the peak
resident set size sampled every 2 ms during the run (``/proc/self/statm``), above the level
before the run.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaForCausalLM, TrainerCallback

from bench.long_texts import long_pairs
from recipes.common import cadence
from spinal_callback.config import SpinalConfig
from spinal_callback.demos.preference_data import make_preference_pairs, tokenizer_corpus
from spinal_callback.demos.tiny import build_tiny_model, build_tiny_tokenizer, llama_1b_config
from spinal_callback.integrations.transformers import SpinalTrainerCallback


class TimedSpinalCallback(SpinalTrainerCallback):
    """The callback with the wall time spent in its hooks added up, to separate its own cost
    from run-to-run noise in steps/s."""

    seconds = 0.0

    def _timed(self, hook: str, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return getattr(super(), hook)(*args, **kwargs)
        finally:
            TimedSpinalCallback.seconds += time.perf_counter() - started

    def on_train_begin(self, *args: Any, **kwargs: Any) -> Any:
        return self._timed("on_train_begin", *args, **kwargs)

    def on_step_end(self, *args: Any, **kwargs: Any) -> Any:
        return self._timed("on_step_end", *args, **kwargs)

    def on_log(self, *args: Any, **kwargs: Any) -> Any:
        return self._timed("on_log", *args, **kwargs)

    def on_train_end(self, *args: Any, **kwargs: Any) -> Any:
        return self._timed("on_train_end", *args, **kwargs)


class StepClock(TrainerCallback):
    """The wall time of each training step, from one ``on_step_end`` to the next: the steady
    step time without the trainer's start-up, which a whole run's steps/s includes."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_step_end(self, *args: Any, **kwargs: Any) -> None:
        self.ends.append(time.perf_counter())

    def median_step(self) -> float:
        return statistics.median(b - a for a, b in itertools.pairwise(self.ends))


class PeakResidentMemory:
    """Samples this process's resident set size in a thread; ``peak_mib`` above the start."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak_mib = 0.0
        self._stop = threading.Event()

    def _rss(self) -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * self.page

    def __enter__(self) -> PeakResidentMemory:
        self._start, self._peak = self._rss(), 0
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, self._rss())
            time.sleep(self.interval)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mib = max(0, self._peak - self._start) / 2**20


def build_models(
    preset: str, device: str, vocab_size: int, path: str | None = None
) -> torch.nn.Module:
    if path is not None:
        from spinal_callback.probe.loading import load_local_model

        return load_local_model(path).to(device)
    if preset == "tiny":
        return build_tiny_model("llama", vocab_size=vocab_size, hidden=64, layers=8)
    if preset == "smollm2-135m":
        from bench.probe_cost import smollm2_config

        dtype = torch.float32 if device == "cpu" else torch.bfloat16
        return LlamaForCausalLM(smollm2_config()).to(device=device, dtype=dtype)
    config = llama_1b_config(vocab_size)
    return LlamaForCausalLM(config).to(device=device, dtype=torch.bfloat16)


def one_run(args: argparse.Namespace, tokenizer: Any, with_spinal: bool) -> dict[str, float]:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    policy = build_models(args.preset, args.device, len(tokenizer), args.model)
    reference = copy.deepcopy(policy)
    count = args.steps * args.batch_size
    rows = long_pairs(count) if args.pairs == "long" else make_preference_pairs(count, seed=0)
    pairs = Dataset.from_list(rows)
    # Never stop: both runs must take the same steps for steps/s to compare.
    every = getattr(args, "every_n_steps", SpinalConfig.every_n_steps)
    cadence_settings = {
        "every_n_steps": every,
        "overhead_budget": getattr(args, "budget", SpinalConfig.overhead_budget),
        "auto_max_steps": getattr(args, "auto_max_steps", SpinalConfig.auto_max_steps),
    }
    callbacks = [TimedSpinalCallback(stop_on=None, **cadence_settings)] if with_spinal else []
    clock = StepClock()
    TimedSpinalCallback.seconds = 0.0
    with tempfile.TemporaryDirectory() as output_dir:
        config = DPOConfig(
            output_dir=output_dir,
            max_steps=args.steps,
            per_device_train_batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            logging_steps=25,
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
            use_cpu=args.device == "cpu",
            bf16=args.device != "cpu",
            seed=0,
        )
        trainer = DPOTrainer(
            model=policy,
            ref_model=reference,
            args=config,
            train_dataset=pairs,
            processing_class=tokenizer,
            callbacks=[*callbacks, clock],
        )
        if args.device != "cpu":
            torch.cuda.reset_peak_memory_stats()
        with PeakResidentMemory() as memory:
            started = time.perf_counter()
            trainer.train()
            seconds = time.perf_counter() - started
        steps = trainer.state.global_step
        peak = (
            torch.cuda.max_memory_allocated() / 2**20 if args.device != "cpu" else memory.peak_mib
        )
    traces = callbacks[0].traces if callbacks else []
    interval = callbacks[0].runner.every_n_steps if callbacks else 0
    return {
        "interval": float(interval),
        "steps_per_second": steps / seconds,
        "median_step_seconds": clock.median_step(),
        "peak_mib": peak,
        "probes": len(traces),
        "callback_share": TimedSpinalCallback.seconds / seconds if callbacks else 0.0,
        # The first probe settles the lens's sample and checks the lens; a long run pays the
        # later ones.
        "probe_seconds": (
            statistics.median(float(trace.metadata["seconds"]) for trace in traces[1:] or traces)
            if traces
            else 0.0
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=["tiny", "smollm2-135m", "llama-1b"], default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench/results/overhead.json")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument(
        "--model", help="a checkpoint directory (from_pretrained) instead of a preset"
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    parser.add_argument(
        "--every-n-steps",
        type=cadence,
        default=SpinalConfig.every_n_steps,
        help="the probe cadence: an int, or 'auto' (overhead_budget, 1%% by default)",
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=SpinalConfig.overhead_budget,
        help="overhead_budget for --every-n-steps auto",
    )
    parser.add_argument(
        "--auto-max-steps",
        type=int,
        default=SpinalConfig.auto_max_steps,
        help="auto_max_steps, the automatic interval's ceiling",
    )
    parser.add_argument(
        "--pairs",
        choices=("recipe", "long"),
        default="recipe",
        help="training pairs: the recipe's synthetic ones (about 20 tokens) or pairs of realistic "
        "length cut from prose paragraphs (bench/long_texts.py, 60-200 tokens)",
    )
    parser.add_argument(
        "--learning-rate",
        type=float,
        default=None,
        help="default 5e-4 for the random-initialised presets, 3e-5 for --model (healthy)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.learning_rate is None:
        args.learning_rate = 3e-5 if args.model else 5e-4
    if args.model:
        from spinal_callback.probe.loading import load_local_tokenizer

        tokenizer = load_local_tokenizer(args.model)
        args.preset = Path(args.model).name
    else:
        tokenizer = build_tiny_tokenizer(tokenizer_corpus(), vocab_size=320)
    runs: dict[str, list[dict[str, float]]] = {"without": [], "with": []}
    for _ in range(args.warmup):  # imports, allocator, first compile paths
        one_run(args, tokenizer, with_spinal=True)
    for _ in range(args.repeats):
        for label in ("without", "with"):
            runs[label].append(one_run(args, tokenizer, with_spinal=label == "with"))
    summary = {
        label: {
            "steps_per_second": statistics.median(r["steps_per_second"] for r in results),
            "peak_mib": statistics.median(r["peak_mib"] for r in results),
            "probes": results[0]["probes"],
            "callback_share": statistics.median(r["callback_share"] for r in results),
            "probe_seconds": statistics.median(r["probe_seconds"] for r in results),
            "interval": statistics.median(r["interval"] for r in results),
            "median_step_seconds": statistics.median(r["median_step_seconds"] for r in results),
        }
        for label, results in runs.items()
    }
    # A short run is dominated by the probes at its start (the reference's and step 0's); a long
    # one pays one probe per `every_n_steps` steps. Both times come from the same runs, so that
    # a load on the machine that differs between the runs with and without does not count.
    every = int(summary["with"]["interval"])
    step_seconds = summary["with"]["median_step_seconds"]
    probe_seconds = summary["with"]["probe_seconds"]
    steady_share = probe_seconds / (every * step_seconds + probe_seconds)
    slowdown = 1 - summary["with"]["steps_per_second"] / summary["without"]["steps_per_second"]
    memory = summary["with"]["peak_mib"] / max(summary["without"]["peak_mib"], 1e-9) - 1
    device = (
        torch.cuda.get_device_name()
        if args.device != "cpu"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    print(
        f"callback overhead: preset {args.preset}, {device}, {args.pairs} pairs, "
        f"{args.steps} steps x {args.repeats} alternating runs"
    )
    print(f"{'':10}{'steps/s':>10}{'peak MiB':>10}{'probes':>8}")
    for label, result in summary.items():
        print(
            f"{label:10}{result['steps_per_second']:10.2f}{result['peak_mib']:10.1f}{result['probes']:8d}"
        )
    print(f"slowdown {slowdown:+.2%} (median steps/s), extra peak memory {memory:+.2%}")
    print(f"time inside the callback's hooks: {summary['with']['callback_share']:.2%} of the run")
    schedule = f"every_n_steps={args.every_n_steps}" + (
        f" (overhead_budget={args.budget:g}, auto_max_steps={args.auto_max_steps}; interval "
        f"{every} at the end)"
        if args.every_n_steps == "auto"
        else ""
    )
    print(
        f"one probe {probe_seconds:.2f} s = {probe_seconds / step_seconds:.2f} training steps "
        f"(median step {step_seconds:.3g} s, in the same runs); "
        f"in a long run at {schedule}: {steady_share:.2%} of the time"
    )
    output = Path(args.out)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(
        json.dumps(
            {
                "device": device,
                "pairs": args.pairs,
                "config": {
                    "every_n_steps": args.every_n_steps,
                    "interval": every,
                    "overhead_budget": args.budget,
                    "auto_max_steps": args.auto_max_steps,
                    "batch_size": args.batch_size,
                },
                "runs": runs,
                "summary": summary,
                "slowdown": slowdown,
                "probe_in_steps": probe_seconds / step_seconds,
                "steady_state_share": steady_share,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
