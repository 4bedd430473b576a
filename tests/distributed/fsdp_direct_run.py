"""The probe of a model wrapped directly (FSDP v1 around the causal LM, as accelerate wraps it,
and ``fully_shard``), two processes over gloo; launched by ``tests/test_engines_fsdp.py`` as
``python -m torch.distributed.run --nproc_per_node=2 tests/distributed/fsdp_direct_run.py
OUT_DIR``.

For each wrapper, cold (the probe before any training forward) and warm (after one): the probe's
trace, the engine's state right after it (``lightning_sharded_run.engine_state``), whether a
training forward and backward then runs, and the state after that. Each rank writes
``OUT_DIR/rank{r}.json`` with the unsharded model's trace beside.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch.distributed as dist
from fsdp_probe_run import shard, train_pass
from lightning_sharded_run import engine_state, trace_record

from spinal_callback.demos.tiny import DEFAULT_PROBE_TEXTS, build_tiny_model, build_tiny_tokenizer
from spinal_callback.probe.spinal_probe import ProbeBatch, SpinalProbe
from tests.distributed.teardown import end_distributed_run


def probe_once(wrapper: str, cold: bool, batch: ProbeBatch, vocabulary: int) -> dict[str, Any]:
    model, _ = shard(build_tiny_model("llama", vocab_size=vocabulary, layers=4, seed=0), wrapper)
    ids = batch.input_ids[:4]
    if not cold:
        train_pass(model, ids)
    trace = trace_record(SpinalProbe(model, batch).run(0))
    whole, busy = engine_state(model)
    try:
        train_pass(model, ids)
        train_error = None
    except RuntimeError as error:  # recorded for the test to report; both ranks get here
        train_error = f"{type(error).__name__}: {error}"
    after_whole, after_busy = engine_state(model)
    return {
        "trace": trace,
        "after_probe": {"whole": whole, "busy": busy},
        "train_error": train_error,
        "after_training": {"whole": after_whole, "busy": after_busy},
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir", type=Path)
    options = parser.parse_args()
    dist.init_process_group("gloo")
    tokenizer = build_tiny_tokenizer()
    batch = ProbeBatch.from_texts(tokenizer, list(DEFAULT_PROBE_TEXTS))
    unsharded = build_tiny_model("llama", vocab_size=len(tokenizer), layers=4, seed=0)
    record: dict[str, Any] = {
        "rank": dist.get_rank(),
        "unsharded": trace_record(SpinalProbe(unsharded, batch).run(0)),
        "runs": {
            f"{wrapper}-{'cold' if cold else 'warm'}": probe_once(
                wrapper, cold, batch, len(tokenizer)
            )
            for wrapper in ("fsdp1", "fully_shard")
            for cold in (True, False)
        },
    }
    (options.out_dir / f"rank{record['rank']}.json").write_text(json.dumps(record))
    end_distributed_run()


if __name__ == "__main__":
    main()
