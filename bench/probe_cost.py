"""Cost and accuracy of SpinalProbe.run() against a bare forward of the same batch, in one process.

For each preset it prints the median time and peak memory of (a) a bare forward of the probe's
texts (one forward per group: the task prompts, and the neutral texts when the probe has them),
(b) the same with ``output_hidden_states=True``, (c) ``SpinalProbe.run()`` at the default
config, and the ratios to (a); the probe's stages (forward to the last late block, spectra,
logit lens, host copy); and the accuracy of the default probe's scores against the same scores
computed on every valid token, in float64, on the same batch. Results go to
``bench/results/probe_cost.json``.

    python -m bench.probe_cost                              # every CPU preset
    python -m bench.probe_cost --preset smollm2-135m --tokens 64
    python -m bench.probe_cost --model ~/.cache/spinal-callback/smollm2-135m-instruct
    python -m bench.probe_cost --preset llama-3.2-1b --device cuda   # bf16, 8 x 256, 8 late blocks

Presets (random init, from configs): ``tiny`` (the tests' Llama, vocabulary 384, its probe
texts), ``smollm2-135m``, ``qwen2.5-0.5b`` and ``llama-3.2-1b`` shapes, with 16 rows of
``--tokens`` random token ids (48 by default; 8 x 256 for ``llama-3.2-1b`` on CUDA). ``--model``
loads a checkpoint directory and probes the recipe's prompts with the default neutral texts.

Memory: on CUDA, the peak of ``torch.cuda.max_memory_allocated`` above the model during the call;
on the CPU, the peak of the running sum of tensor allocations and frees recorded by
``torch.profiler`` during one call.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from bench.long_texts import long_texts
from spinal_callback import ProbeBatch, SpinalConfig, SpinalProbe
from spinal_callback.demos.tiny import (
    DEFAULT_PROBE_TEXTS,
    build_tiny_model,
    build_tiny_tokenizer,
    llama_1b_config,
)
from spinal_callback.probe.metrics import contraction_scores

TOKENS_PER_ROW = 48
ROWS = 16


@dataclass
class Setup:
    model: torch.nn.Module
    batch: ProbeBatch
    config: SpinalConfig
    neutral: ProbeBatch | None = None


def random_rows(rows: int, tokens: int, vocab: int) -> ProbeBatch:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(100, vocab - 1, (rows, tokens), generator=generator).tolist()
    return ProbeBatch.from_token_ids(ids)


def tiny(device: torch.device, tokens: int) -> Setup:
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model("llama", vocab_size=len(tokenizer))
    return Setup(model, ProbeBatch.from_texts(tokenizer, list(DEFAULT_PROBE_TEXTS)), SpinalConfig())


def smollm2_config() -> LlamaConfig:
    """SmolLM2-135M's shape: 30 blocks, width 576, a 49,152-token vocabulary, tied head."""
    return LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    )


def smollm2(device: torch.device, tokens: int) -> Setup:
    model = LlamaForCausalLM(smollm2_config())
    return Setup(model, random_rows(ROWS, tokens, 49152), SpinalConfig())


def qwen_config() -> Qwen2Config:
    """Qwen2.5-0.5B's shape: 24 blocks, width 896, a 151,936-token vocabulary, tied head."""
    return Qwen2Config(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
    )


def qwen(device: torch.device, tokens: int) -> Setup:
    model = Qwen2ForCausalLM(qwen_config())
    return Setup(model, random_rows(ROWS, tokens, 151936), SpinalConfig())


def llama_1b(device: torch.device, tokens: int) -> Setup:
    model = LlamaForCausalLM(llama_1b_config())
    if device.type == "cuda":
        model = model.to(dtype=torch.bfloat16)
        batch = random_rows(8, 256, 128256)
    else:
        batch = random_rows(ROWS, tokens, 128256)
    return Setup(model, batch, SpinalConfig(late_layers=list(range(8, 16))))


PRESETS: dict[str, Callable[[torch.device, int], Setup]] = {
    "tiny": tiny,
    "smollm2-135m": smollm2,
    "qwen2.5-0.5b": qwen,
    "llama-3.2-1b": llama_1b,
}
CPU_PRESETS = ("tiny", "smollm2-135m", "qwen2.5-0.5b", "llama-3.2-1b")


def checkpoint(path: str, texts: str, config: SpinalConfig) -> Setup:
    """A checkpoint directory probed with ``texts``: ``"recipe"`` (the recipe's 32 prompts of
    about 5 tokens) or ``"dev"``/``"test"`` (``long_texts``: 32 paragraphs of 60-200 tokens), and
    the default neutral texts."""
    from spinal_callback.demos.preference_data import train_eval_split
    from spinal_callback.probe.loading import load_local_model, load_local_tokenizer
    from spinal_callback.probe.texts import DEFAULT_NEUTRAL_TEXTS

    tokenizer = load_local_tokenizer(path)
    model = load_local_model(path)
    if texts == "recipe":
        prompts = list(train_eval_split(train_count=64, seed=0)[1]["prompt"][:32])
    else:
        prompts = long_texts(texts)
    batch = ProbeBatch.from_texts(tokenizer, prompts, config.max_probe_length)
    neutral = ProbeBatch.from_texts(tokenizer, list(DEFAULT_NEUTRAL_TEXTS), config.max_probe_length)
    return Setup(model, batch, config, neutral)


def interleaved_medians(
    calls: Mapping[str, Callable[[], object]], device: torch.device, repeats: int
) -> dict[str, float]:
    """Median seconds of each call, timed in rounds (each call once per round, after one
    warm-up round), so that a load that comes and goes on a shared machine hits every call
    alike and their ratios hold."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for round_index in range(repeats + 1):
        for name, call in calls.items():
            synchronize(device)
            start = time.perf_counter()
            call()
            synchronize(device)
            if round_index > 0:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_memory_mib(call: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
        call()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - baseline) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        call()
    events = sorted(profiler.events(), key=lambda event: event.time_range.start)
    running = peak = 0
    for event in events:
        running += event.self_cpu_memory_usage
        peak = max(peak, running)
    return peak / 2**20


def stages(probe: SpinalProbe, device: torch.device, repeats: int) -> dict[str, float]:
    """Median milliseconds of the probe's stages, run one after the other as ``run`` does."""
    held: dict[str, Any] = {}
    group = probe.groups[0]

    def forward() -> None:
        with torch.no_grad():
            held["hidden"] = probe._capture(device)

    def spectra() -> None:
        with torch.no_grad():
            held["alpha"] = contraction_scores(
                held["hidden"][0], dtype=getattr(torch, probe.config.spectrum_dtype)
            )

    def lens() -> None:
        with torch.no_grad():
            held["lens"] = probe._lens(held["hidden"][1], group.targets.to(device), 0)

    def host_copy() -> None:
        torch.cat([held["alpha"][0].float(), held["lens"][0]]).cpu()

    forward()
    spectra()
    lens()
    names = {"forward to the last late block": forward, "spectra": spectra, "lens": lens}
    names["host copy"] = host_copy
    result = {name: ms * 1e3 for name, ms in interleaved_medians(names, device, repeats).items()}
    groups = len(probe.groups)
    if groups > 1:
        result["(spectra and lens run once per probe group)"] = float(groups)
    return result


def accuracy(setup: Setup, probe: SpinalProbe) -> dict[str, float]:
    """How far the default probe's scores are from every valid token (of each probe group) with
    the model and the spectra in float64."""
    exact_model = copy.deepcopy(setup.model).to(dtype=torch.float64)
    groups = [setup.batch] if setup.neutral is None else [setup.batch, setup.neutral]
    tokens = max(batch.num_valid_tokens for batch in groups)
    exact_config = replace(
        setup.config, spectrum_tokens=tokens, transport_tokens=tokens, spectrum_dtype="float64"
    )
    exact = SpinalProbe(exact_model, setup.batch, exact_config, setup.neutral).run()
    default = probe.run()
    pairs = [(default, exact)]
    if default.neutral is not None and exact.neutral is not None:
        pairs.append((default.neutral, exact.neutral))
    transport_error = max(
        float((d.transport.double() - e.transport.double()).abs().max()) for d, e in pairs
    )
    contraction_error = max(
        float(
            ((d.contraction.double() - e.contraction.double()) / e.contraction.double()).abs().max()
        )
        for d, e in pairs
    )
    return {
        "transport_abs_error_max": transport_error,
        "contraction_rel_error_max": contraction_error,
        "valid_tokens": float(tokens),
    }


def measure(name: str, setup: Setup, device: torch.device, repeats: int) -> dict[str, Any]:
    model = setup.model.to(device).eval()
    probe = SpinalProbe(model, setup.batch, setup.config, setup.neutral)
    inputs = {
        "input_ids": setup.batch.input_ids.to(device),
        "attention_mask": setup.batch.attention_mask.to(device),
        "use_cache": False,
    }

    texts = [inputs]
    if setup.neutral is not None:
        texts.append(
            {
                "input_ids": setup.neutral.input_ids.to(device),
                "attention_mask": setup.neutral.attention_mask.to(device),
                "use_cache": False,
            }
        )

    def bare() -> object:
        """One plain forward of each probe group (task prompts, neutral texts)."""
        with torch.inference_mode():
            return [model(**group).logits for group in texts]

    def hidden_states() -> object:
        with torch.inference_mode():
            return [model(**group, output_hidden_states=True).hidden_states for group in texts]

    calls = {"bare forward": bare, "output_hidden_states": hidden_states, "probe": probe.run}
    medians = interleaved_medians(calls, device, repeats)
    rows = {
        call_name: {
            "median_ms": medians[call_name] * 1e3,
            "peak_mib": peak_memory_mib(call, device),
        }
        for call_name, call in calls.items()
    }
    for row in rows.values():
        row["time_ratio"] = row["median_ms"] / rows["bare forward"]["median_ms"]
        row["memory_ratio"] = row["peak_mib"] / max(rows["bare forward"]["peak_mib"], 1e-9)
    record = {
        "preset": name,
        "probe_shape": list(setup.batch.input_ids.shape),
        "neutral_shape": None if setup.neutral is None else list(setup.neutral.input_ids.shape),
        "late_layers": probe.layers,
        "vocab": probe.vocab_size,
        "calls": rows,
        "stages_ms": stages(probe, device, repeats),
        "lens_tokens": [probe.lens_tokens[i] for i in range(len(probe.groups))],
        "valid_tokens": [group.batch.num_valid_tokens for group in probe.groups],
    }
    if device.type == "cpu":
        setup.model = model
        record["accuracy"] = accuracy(setup, probe)
    return record


def print_record(record: dict[str, Any]) -> None:
    print(
        f"\n{record['preset']}: probe {record['probe_shape']} (neutral "
        f"{record['neutral_shape']}), late blocks {record['late_layers']}, vocab {record['vocab']}"
    )
    print(f"{'':24}{'median ms':>11}{'x bare':>8}{'peak MiB':>10}{'x bare':>8}")
    for name, row in record["calls"].items():
        print(
            f"{name:24}{row['median_ms']:11.1f}{row['time_ratio']:8.2f}"
            f"{row['peak_mib']:10.1f}{row['memory_ratio']:8.2f}"
        )
    print("  stages: " + ", ".join(f"{k} {v:.1f} ms" for k, v in record["stages_ms"].items()))
    tokens, valid = record["lens_tokens"], record["valid_tokens"]
    print(f"  lens tokens per probe group {tokens} of {valid} valid")
    if "accuracy" in record:
        accuracy = record["accuracy"]
        print(
            f"  accuracy vs every valid token in float64: transport max |error| "
            f"{accuracy['transport_abs_error_max']:.4f}, contraction max relative error "
            f"{accuracy['contraction_rel_error_max']:.2%}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), action="append")
    parser.add_argument("--model", help="a checkpoint directory (from_pretrained)")
    parser.add_argument(
        "--texts",
        choices=("recipe", "dev", "test"),
        default="recipe",
        help="--model's probe texts: the recipe's short prompts, or 32 paragraphs of realistic "
        "length (bench/long_texts.py; dev split for tuning, test split for checking)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="a SpinalConfig field to change from the default, e.g. --set transport_tokens=512",
    )
    parser.add_argument("--tokens", type=int, default=TOKENS_PER_ROW, help="tokens per probe row")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", default="bench/results/probe_cost.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"probe cost on {where}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    overrides = dict(item.split("=", 1) for item in args.set)
    records = []
    presets = [] if args.model and not args.preset else (args.preset or list(CPU_PRESETS))
    for name in presets:
        torch.manual_seed(0)
        setup = PRESETS[name](device, args.tokens)
        setup.config = replace(setup.config, **overrides)
        records.append(measure(name, setup, device, args.repeats) | {"config_overrides": overrides})
        print_record(records[-1])
    if args.model:
        setup = checkpoint(args.model, args.texts, replace(SpinalConfig(), **overrides))
        name = f"{Path(args.model).name} ({args.texts} texts)"
        records.append(measure(name, setup, device, args.repeats) | {"config_overrides": overrides})
        print_record(records[-1])
    output = Path(args.out)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"device": where, "records": records}, indent=2))
    print(f"\nwritten to {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
