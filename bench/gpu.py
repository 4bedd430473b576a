"""The GPU pass: ``make bench-gpu``, one script, one table, about 8 minutes on one GPU.

    python -m bench.gpu                      # on the GPU (CUDA)
    python -m bench.gpu --device cpu --dry-run   # every row on small shapes, on a CPU, in ~1 min

Rows, each a ratio measured in this one process (absolute times drift from machine to machine):

1. the probe against a bare forward, for the Llama-3.2-1B and Qwen2.5-0.5B shapes (random
   weights), in bfloat16 at 8 rows x 256 tokens (``bench/probe_cost.py``'s measure);
2. the probe's peak memory against the bare forward's, for the same shapes;
3. the training overhead of the callback on SmolLM2-135M in bfloat16 with pairs of realistic
   length (``bench/overhead.py``'s runs): at the default cadence and at ``every_n_steps="auto"``.
   The real checkpoint when ``make real-model`` built it on this machine, else its shape with
   random weights (the cost depends on the shapes, not on the weights);
4. ``pytest -m gpu``.

The targets beside each row are the project's GPU targets: at most 1.5x a bare forward, peak
memory within 10% of the bare forward's, and an overhead of at most 0.5% at the default
cadence (and at most the 1% budget, give or take 20%, at the automatic one). ``--dry-run``
shrinks every shape so that the script is tested on a CPU (``tests/test_bench_gpu.py``); its
figures say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from bench.probe_cost import Setup, measure, qwen_config, random_rows
from spinal_callback.config import SpinalConfig
from spinal_callback.demos.tiny import llama_1b_config

ROOT = Path(__file__).resolve().parents[1]
ROWS, TOKENS = 8, 256
TARGETS = {"time": 1.5, "memory": 1.10, "default": 0.005, "auto": 0.01}


def shapes(dry_run: bool) -> dict[str, tuple[torch.nn.Module, int]]:
    """The two model shapes (random weights) and their vocabularies; ``dry_run``: 4 narrow
    blocks and a small vocabulary, the same code path."""
    small = {"num_hidden_layers": 4, "hidden_size": 64, "intermediate_size": 128}
    heads = {"num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 4096}
    if dry_run:
        llama = LlamaConfig(**small, **heads, tie_word_embeddings=True)
        qwen = Qwen2Config(**small, **heads, tie_word_embeddings=True)
    else:
        llama, qwen = llama_1b_config(), qwen_config()
    return {
        "Llama-3.2-1B shape": (LlamaForCausalLM(llama), llama.vocab_size),
        "Qwen2.5-0.5B shape": (Qwen2ForCausalLM(qwen), qwen.vocab_size),
    }


def probe_rows(device: torch.device, dry_run: bool, repeats: int) -> list[dict[str, Any]]:
    """Rows 1 and 2: the probe's time and peak memory against a bare forward's."""
    rows, tokens = (2, 32) if dry_run else (ROWS, TOKENS)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    found = []
    for name, (model, vocab) in shapes(dry_run).items():
        torch.manual_seed(0)
        setup = Setup(model.to(dtype=dtype), random_rows(rows, tokens, vocab), SpinalConfig())
        record = measure(name, setup, device, repeats)
        probe, bare = record["calls"]["probe"], record["calls"]["bare forward"]
        found.append(
            {
                "name": name,
                "shape": f"{rows} x {tokens}, {str(dtype).removeprefix('torch.')}",
                "time_ratio": probe["time_ratio"],
                "memory_ratio": probe["memory_ratio"],
                "probe_ms": probe["median_ms"],
                "bare_ms": bare["median_ms"],
            }
        )
    return found


def overhead_rows(device: torch.device, dry_run: bool) -> list[dict[str, Any]]:
    """Row 3: the callback's share of a training run, at the default and the automatic
    cadence (``bench/overhead.py`` in a subprocess each, for a clean allocator)."""
    from recipes.smollm2 import available, checkpoint_dir

    found = []
    for cadence in (str(SpinalConfig.every_n_steps), "auto"):
        out = ROOT / "bench" / "results" / f"gpu_overhead_{cadence}.json"
        command = [
            sys.executable, "-m", "bench.overhead", "--device", str(device.type),
            "--every-n-steps", cadence, "--pairs", "long", "--out", str(out),
        ]  # fmt: skip
        if dry_run:
            command += ["--steps", "12", "--batch-size", "2", "--repeats", "1", "--warmup", "0"]
        else:
            command += ["--steps", "200", "--batch-size", "8", "--repeats", "2", "--warmup", "1"]
            if available():
                command += ["--model", str(checkpoint_dir())]
            else:
                command += ["--preset", "smollm2-135m"]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            raise RuntimeError(f"bench.overhead failed:\n{done.stderr[-3000:]}")
        result = json.loads(out.read_text())
        found.append(
            {
                "name": f"overhead at every_n_steps={cadence}",
                "model": "real SmolLM2-135M" if available() and not dry_run else "tiny or shape",
                "share": result["steady_state_share"],
                "interval": result["config"]["interval"],
                "probe_in_steps": result["probe_in_steps"],
            }
        )
    return found


def gpu_tests(device: torch.device) -> dict[str, Any]:
    """Row 4: ``pytest -m gpu`` (on a CPU every test skips: the row then says so)."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    summary = (done.stdout.strip().splitlines() or ["(no output)"])[-1]
    return {"rc": done.returncode, "summary": summary, "seconds": time.perf_counter() - started}


def table(
    device_name: str, probes: list[dict[str, Any]], overhead: list[dict[str, Any]], tests: dict
) -> str:
    """The one table: each row's figure beside its target."""

    def met(ok: bool) -> str:
        return "yes" if ok else "NO"

    lines = [
        f"GPU pass on {device_name}",
        f"{'row':52}{'figure':>16}{'target':>12}{'met':>6}",
    ]
    for row in probes:
        label = f"{row['name']}, {row['shape']}"
        lines.append(
            f"{'probe time x bare forward: ' + label:52}{row['time_ratio']:16.2f}"
            f"{TARGETS['time']:12.2f}{met(row['time_ratio'] <= TARGETS['time']):>6}"
        )
        lines.append(
            f"{'peak memory x bare forward: ' + label:52}{row['memory_ratio']:16.2f}"
            f"{TARGETS['memory']:12.2f}{met(row['memory_ratio'] <= TARGETS['memory']):>6}"
        )
    for row in overhead:
        auto = row["name"].endswith("auto")
        target = TARGETS["auto"] * 1.2 if auto else TARGETS["default"]
        label = f"{row['name']} ({row['model']}, interval {row['interval']})"
        lines.append(
            f"{label:52}{row['share']:16.2%}{target:12.2%}{met(row['share'] <= target):>6}"
        )
    lines.append(f"{'pytest -m gpu':52}{tests['summary'][:16]:>16}{'all pass':>12}"
                 f"{met(tests['rc'] in (0, 5)):>6}")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dry-run", action="store_true", help="small shapes: test the script")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", default="bench/results/gpu.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here; pass --device cpu --dry-run to test the script")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    repeats = args.repeats or (1 if args.dry_run else 5)
    started = time.perf_counter()
    probes = probe_rows(device, args.dry_run, repeats)
    overhead = overhead_rows(device, args.dry_run)
    tests = gpu_tests(device)
    text = table(
        name + (" (dry run: small shapes)" if args.dry_run else ""), probes, overhead, tests
    )
    print(text)
    print(f"{time.perf_counter() - started:.0f} s in all")
    output = Path(args.out)
    output.parent.mkdir(parents=True, exist_ok=True)
    record = {"device": name, "dry_run": args.dry_run, "probes": probes, "overhead": overhead,
              "gpu_tests": tests, "table": text}  # fmt: skip
    output.write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
