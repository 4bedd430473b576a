"""Two-process FSDP probe over gloo on CPU; launched by ``tests/test_distributed.py`` as
``python -m torch.distributed.run --nproc_per_node=2 tests/distributed/fsdp_probe_run.py OUT_DIR
--wrapper {fully_shard,fsdp1}``.

Every rank builds the same tiny Llama (same seed); rank 0 also traces it unsharded as the
reference. Then, twice over, the model is sharded (``fully_shard`` on each decoder block and on
the root, or FSDP v1 wrapping each decoder block and the root) and ``SpinalProbe`` runs on every
rank:

* ``warm``: one forward/backward first (as mid-training), then probe, backward again, probe;
* ``cold``: probe before any training forward (as at step 0), then one forward/backward, whose
  error is recorded instead of raised, so both ranks still report.

No optimizer step is taken, so every probe must reproduce the unsharded reference. Each rank
writes ``OUT_DIR/rank{r}.json``.
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from spinal_callback.demos.tiny import DEFAULT_PROBE_TEXTS, build_tiny_model, build_tiny_tokenizer
from spinal_callback.probe.spinal_probe import ProbeBatch, SpinalProbe
from tests.distributed.teardown import end_distributed_run


def trace_record(probe: SpinalProbe, step: int) -> dict[str, Any]:
    trace = probe.run(step)
    return {
        "step": trace.step,
        "layers": trace.layers,
        "contraction": trace.contraction.tolist(),
        "transport": trace.transport.tolist(),
        "summary": trace.summary,
    }


def shard(model: nn.Module, wrapper: str) -> tuple[nn.Module, int]:
    """``model`` sharded over the world, and the number of sharded units (blocks + root)."""
    if wrapper == "fully_shard":
        from torch.distributed.fsdp import FSDPModule, fully_shard

        for block in model.model.layers:  # type: ignore[union-attr]
            fully_shard(block)
        fully_shard(model)
        units = sum(isinstance(m, FSDPModule) for m in model.modules())
        return model, units
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    block_class = type(model.model.layers[0])  # type: ignore[index, union-attr]
    wrapped = FullyShardedDataParallel(
        model,
        auto_wrap_policy=functools.partial(
            transformer_auto_wrap_policy, transformer_layer_cls={block_class}
        ),
        device_id=torch.device("cpu"),
        use_orig_params=True,
    )
    units = sum(isinstance(m, FullyShardedDataParallel) for m in wrapped.modules())
    return wrapped, units


def train_pass(model: nn.Module, ids: torch.Tensor) -> None:
    """One training forward and backward, without an optimizer step (weights unchanged)."""
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()


def block_parameters_are_sharded(model: nn.Module) -> bool:
    """True when every decoder-block parameter holds only part of its values on this rank."""
    from torch.distributed.tensor import DTensor

    blocks = [p for n, p in model.named_parameters() if ".layers." in n]
    return all(isinstance(p, DTensor) and p.to_local().numel() < p.numel() for p in blocks)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--wrapper", choices=["fully_shard", "fsdp1"], default="fully_shard")
    options = parser.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    tokenizer = build_tiny_tokenizer()
    batch = ProbeBatch.from_texts(tokenizer, list(DEFAULT_PROBE_TEXTS))
    ids = batch.input_ids[:4]

    def fresh_model() -> nn.Module:
        return build_tiny_model("llama", vocab_size=len(tokenizer), layers=4, seed=0)

    reference = trace_record(SpinalProbe(fresh_model(), batch), 0) if rank == 0 else None

    warm, units = shard(fresh_model(), options.wrapper)
    sharded = block_parameters_are_sharded(warm) if options.wrapper == "fully_shard" else None
    train_pass(warm, ids)
    warm_probe = SpinalProbe(warm, batch)
    warm_traces = [trace_record(warm_probe, 1)]
    train_pass(warm, ids)
    warm_traces.append(trace_record(warm_probe, 2))

    cold, _ = shard(fresh_model(), options.wrapper)
    cold_probe = SpinalProbe(cold, batch)
    cold_traces = [trace_record(cold_probe, 0)]
    try:
        train_pass(cold, ids)
        train_error = None
    except RuntimeError as error:  # recorded for the test to report; both ranks get here
        train_error = f"{type(error).__name__}: {error}"
    if train_error is None:
        cold_traces.append(trace_record(cold_probe, 1))

    result = {
        "rank": rank,
        "world_size": dist.get_world_size(),
        "wrapper": options.wrapper,
        "sharded_units": units,
        "block_parameters_sharded": sharded,
        "reference": reference,
        "warm_traces": warm_traces,
        "cold_traces": cold_traces,
        "train_after_cold_probe_error": train_error,
    }
    (options.out_dir / f"rank{rank}.json").write_text(json.dumps(result))
    end_distributed_run()


if __name__ == "__main__":
    main()
