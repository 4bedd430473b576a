"""Cost of SpinalProbe.run() against a bare forward of the same probe batch, in one process.

Prints the median time and peak memory of (a) a bare forward, (b) the same forward with
``output_hidden_states=True``, (c) ``SpinalProbe.run()``, and the ratios to (a); writes the
numbers to ``bench/results/probe_cost.json``.

    python bench/probe_cost.py                      # tiny Llama on the CPU
    python bench/probe_cost.py --preset llama-1b    # Llama-3.2-1B-shaped, bf16, on CUDA

Memory: on CUDA, the peak of ``torch.cuda.max_memory_allocated`` above the model during the
call; on the CPU (whose allocator keeps no peak statistic), the peak of the running sum of tensor
allocations and frees recorded by ``torch.profiler`` during one call.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from spinal_callback import ProbeBatch, SpinalConfig, SpinalProbe
from spinal_callback.tiny import (
    DEFAULT_PROBE_TEXTS,
    build_tiny_model,
    build_tiny_tokenizer,
    llama_1b_config,
)


def tiny_setup(device: torch.device) -> tuple[torch.nn.Module, ProbeBatch, SpinalConfig]:
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model("llama", vocab_size=len(tokenizer)).to(device)
    batch = ProbeBatch.from_texts(tokenizer, list(DEFAULT_PROBE_TEXTS))
    return model, batch, SpinalConfig()


def llama_1b_setup(device: torch.device) -> tuple[torch.nn.Module, ProbeBatch, SpinalConfig]:
    config = llama_1b_config()
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device=device, dtype=torch.bfloat16).eval()
    generator = torch.Generator().manual_seed(0)
    token_ids = torch.randint(1000, 120000, (8, 256), generator=generator).tolist()
    return model, ProbeBatch.from_token_ids(token_ids), SpinalConfig(late_layers=list(range(8, 16)))


PRESETS = {"tiny": tiny_setup, "llama-1b": llama_1b_setup}


def build_calls(
    preset: str, device: torch.device
) -> tuple[dict[str, Callable[[], object]], SpinalProbe]:
    model, batch, config = PRESETS[preset](device)
    probe = SpinalProbe(model, batch, config)
    inputs = {
        "input_ids": batch.input_ids.to(device),
        "attention_mask": batch.attention_mask.to(device),
        "use_cache": False,
    }

    def bare() -> object:
        with torch.inference_mode():
            return model(**inputs).logits

    def with_hidden_states() -> object:
        with torch.inference_mode():
            return model(**inputs, output_hidden_states=True).hidden_states

    calls = {
        "a bare forward": bare,
        "b output_hidden_states": with_hidden_states,
        "c SpinalProbe.run": probe.run,
    }
    return calls, probe


def median_seconds(
    call: Callable[[], object], device: torch.device, warmup: int, repeats: int
) -> float:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_memory_mib(call: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
        call()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - baseline) / 2**20
    return profiled_cpu_peak_mib(call)


def profiled_cpu_peak_mib(call: Callable[[], object]) -> float:
    """Peak of the running sum of CPU tensor allocations and frees, in call order."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        call()
    events = sorted(profiler.events(), key=lambda event: event.time_range.start)
    running = peak = 0
    for event in events:
        running += event.self_cpu_memory_usage
        peak = max(peak, running)
    return peak / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", default="bench/results/probe_cost.json")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    # A tiny model gains nothing from more threads, and an oversubscribed OpenMP pool on a busy
    # machine was seen to run 100x slower, swamping the ratios.
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    calls, probe = build_calls(args.preset, device)
    results = {}
    for name, call in calls.items():
        results[name] = {
            "median_ms": median_seconds(call, device, args.warmup, args.repeats) * 1e3,
            "peak_mib": peak_memory_mib(call, device),
        }
    bare = results["a bare forward"]
    for result in results.values():
        result["time_ratio"] = result["median_ms"] / bare["median_ms"]
        result["memory_ratio"] = (
            result["peak_mib"] / bare["peak_mib"] if bare["peak_mib"] > 0 else float("nan")
        )
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f"CPU, {torch.get_num_threads()} threads"
    print(
        f"probe cost: preset {args.preset}, {device_name}, "
        f"probe {tuple(probe.batch.input_ids.shape)}, "
        f"late band {probe.layers}, torch {torch.__version__}"
    )
    print(f"{'':26}{'median ms':>11}{'x bare':>8}{'peak MiB':>10}{'x bare':>8}")
    for name, result in results.items():
        print(
            f"{name:26}{result['median_ms']:11.2f}{result['time_ratio']:8.2f}"
            f"{result['peak_mib']:10.1f}{result['memory_ratio']:8.2f}"
        )
    output = Path(args.out)
    output.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "preset": args.preset,
        "device": device_name,
        "torch": torch.__version__,
        "results": results,
    }
    output.write_text(json.dumps(record, indent=2))
    print(f"written to {output}")


if __name__ == "__main__":
    main()
