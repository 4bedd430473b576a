"""Cost of ``localize``'s patching stage against bare forwards of the same pair batches.

The design target is ``L + 2`` forwards per batch of pairs (base and tuned once, with every
block output cached, then one patched base forward per block). This measures, in one process,
the wall time of the patching stage (``top_layers=0``, one bootstrap draw) and of one bare
forward of the base model over the same batches, and reports their ratio next to ``L + 2``.
Also the low-rank stage with ``top_layers=1`` and its forward count.

    python bench/localize_cost.py                     # 8-block Llama, width 256, on the CPU
    python bench/localize_cost.py --device cuda       # the same on a GPU
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from spinal_callback.demos.preference_data import (
    TOKENIZER_VOCAB_SIZE,
    make_preference_pairs,
    tokenizer_corpus,
)
from spinal_callback.demos.tiny import build_tiny_model, build_tiny_tokenizer
from spinal_callback.tools.localize import localize
from spinal_callback.tools.pairs import SIDES, collate_pairs


def setup(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.nn.Module, Any, list]:
    tokenizer = build_tiny_tokenizer(tokenizer_corpus(), vocab_size=TOKENIZER_VOCAB_SIZE)
    base = build_tiny_model(
        "llama", vocab_size=len(tokenizer), hidden=args.hidden, layers=args.layers, seed=0
    )
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        block = tuned.model.layers[args.layers // 2].mlp.down_proj
        block.weight.add_(0.05 * torch.randn_like(block.weight))
    device = torch.device(args.device)
    pairs = make_preference_pairs(args.pairs, seed=1)
    return base.to(device).eval(), tuned.to(device).eval(), tokenizer, pairs


def bare_forwards(model: torch.nn.Module, tokenizer: Any, pairs: list, batch_size: int) -> None:
    device = next(model.parameters()).device
    for start in range(0, len(pairs), batch_size):
        batch = collate_pairs(tokenizer, pairs[start : start + batch_size])
        ids = torch.cat([batch[f"{side}_ids"] for side in SIDES]).to(device)
        attention = torch.cat([batch[f"{side}_attention"] for side in SIDES]).to(device)
        with torch.no_grad():
            model(input_ids=ids, attention_mask=attention, use_cache=False)


def timed(call: Any, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    call()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="bench/results/localize_cost.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base, tuned, tokenizer, pairs = setup(args)
    device = torch.device(args.device)
    options = {"batch_size": args.batch_size, "bootstrap": 1, "progress": False}

    def patching() -> None:
        localize(base, tuned, tokenizer, pairs, top_layers=0, **options)

    def low_rank() -> None:
        localize(base, tuned, tokenizer, pairs, top_layers=1, ranks=[1, 4, 16], **options)

    patching()  # warm-up
    bare, patch, both = [], [], []
    for _ in range(args.repeats):
        bare.append(timed(lambda: bare_forwards(base, tokenizer, pairs, args.batch_size), device))
        patch.append(timed(patching, device))
        both.append(timed(low_rank, device))
    counts = localize(base, tuned, tokenizer, pairs, top_layers=1, ranks=[1, 4, 16], **options)
    results = {
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "layers": args.layers,
        "hidden": args.hidden,
        "pairs": args.pairs,
        "batch_size": args.batch_size,
        "bare_forward_s": statistics.median(bare),
        "patching_s": statistics.median(patch),
        "patching_over_bare": statistics.median(patch) / statistics.median(bare),
        "target_forwards": args.layers + 2,
        "patching_forwards_per_batch": counts.settings["patching_forwards_per_batch"],
        "low_rank_extra_s": statistics.median(both) - statistics.median(patch),
        "low_rank_forwards_per_batch": counts.settings["low_rank_forwards_per_batch"],
    }
    print(
        f"{results['device']}: {args.layers} blocks, width {args.hidden}, {args.pairs} pairs in "
        f"batches of {args.batch_size}\n"
        f"  bare forward over all batches  {results['bare_forward_s'] * 1e3:8.1f} ms\n"
        f"  patching stage                 {results['patching_s'] * 1e3:8.1f} ms  = "
        f"{results['patching_over_bare']:.2f} bare forwards (design: L + 2 = "
        f"{results['target_forwards']}; counted {results['patching_forwards_per_batch']:.0f} "
        "forwards per batch)\n"
        f"  low rank, 1 block x 3 ranks   +{results['low_rank_extra_s'] * 1e3:8.1f} ms  "
        f"({results['low_rank_forwards_per_batch']:.0f} forwards per batch)"
    )
    output = Path(args.out)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
