"""TRL ``DPOTrainer`` runs under DDP and under accelerate's FSDP2 (gloo, CPU), one after the
other in the same processes, with ``SpinalTrainerCallback`` probing every 2 steps:

    python -m torch.distributed.run --nproc_per_node=2 tests/distributed/fsdp_hf_run.py OUT_DIR
        --engines ddp,fsdp2

accelerate silently keeps DDP on the CPU even when the trainer asks for FSDP; ``fsdp_on_cpu``
is the test-only patch that lets FSDP2 run. For each engine, every rank records the model's
wrapper, its probe traces, the trace of the same model unsharded at step 0, the trace of the
final weights gathered into an unsharded copy, and the engine's state after each probe. Each
rank writes ``OUT_DIR/rank{r}.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import datasets
import torch
import torch.distributed as dist
import trl
from lightning_sharded_run import DRIFTS, engine_state, trace_record
from torch import nn
from transformers import TrainerCallback
from trl_ddp_run import preference_rows

from spinal_callback.demos.tiny import DEFAULT_PROBE_TEXTS, build_tiny_model, build_tiny_tokenizer
from spinal_callback.integrations.transformers import SpinalTrainerCallback
from spinal_callback.probe.spinal_probe import SpinalProbe
from tests.distributed.teardown import end_distributed_run

EVERY_N_STEPS = 2


def fsdp_on_cpu() -> None:
    """Test only: ``AcceleratorState`` takes the FSDP plugin only on accelerator device types
    and keeps DDP (``MULTI_CPU``) on the CPU; take it there too."""
    from accelerate.state import AcceleratorState, DistributedType

    original = AcceleratorState.__init__

    def __init__(self: Any, *args: Any, fsdp_plugin: Any = None, **kwargs: Any) -> None:
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, fsdp_plugin

    AcceleratorState.__init__ = __init__  # type: ignore[method-assign]


def reset_accelerate() -> None:
    """Forget the previous trainer's accelerate state (a singleton), keeping the process group."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    PartialState._shared_state.pop("distributed_type", None)


class EngineStateCheck(TrainerCallback):
    """After each probe (it follows the spinal callback): the sharded units left gathered or
    not idle, as ``lightning_sharded_run.engine_state`` reads them."""

    def __init__(self) -> None:
        self.model: nn.Module | None = None
        self.after_probes: list[dict[str, Any]] = []

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.model = kwargs["model"]
        self._check(state.global_step)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step % EVERY_N_STEPS == 0:
            self._check(state.global_step)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._check(state.global_step)

    def _check(self, step: int) -> None:
        assert self.model is not None
        whole, busy = engine_state(self.model)
        self.after_probes.append({"step": step, "whole": whole, "busy": busy})


def unsharded_trace(state: dict[str, torch.Tensor] | None, probe: SpinalProbe) -> Any:
    model = build_tiny_model("llama", vocab_size=len(build_tiny_tokenizer()), layers=4, seed=0)
    if state is not None:
        model.load_state_dict(state)
    plain = SpinalProbe(model, probe.batch, probe.config, probe.neutral_batch, probe.lens_tokens)
    return trace_record(plain.run(0))


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole weights on every rank (a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {key: value.clone() for key, value in state.items()}


def train(engine: str, out_dir: Path, max_steps: int) -> dict[str, Any]:
    tokenizer = build_tiny_tokenizer()
    policy = build_tiny_model("llama", vocab_size=len(tokenizer), layers=4, seed=0).train()
    reference = copy.deepcopy(policy).eval()
    callback = SpinalTrainerCallback(
        every_n_steps=EVERY_N_STEPS, probe_texts=list(DEFAULT_PROBE_TEXTS), drift_every=1
    )
    check = EngineStateCheck()
    sharding: dict[str, Any] = {}
    if engine == "fsdp2":
        block = type(policy.model.layers[0]).__name__
        sharding = {
            "fsdp": "full_shard",
            "fsdp_config": {"fsdp_version": 2, "transformer_layer_cls_to_wrap": [block]},
        }
    args = trl.DPOConfig(
        output_dir=str(out_dir / engine),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        logging_steps=EVERY_N_STEPS,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        ddp_backend="gloo",
        learning_rate=1e-3,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
        # float32 under both engines: TRL's default bf16 autocasts the DDP forward only.
        bf16=False,
        **sharding,
    )
    trainer = trl.DPOTrainer(
        model=policy,
        ref_model=reference,
        args=args,
        train_dataset=datasets.Dataset.from_list(preference_rows(64)),
        processing_class=tokenizer,
        callbacks=[callback, check],
    )
    started, drifts = time.perf_counter(), DRIFTS["measured"]
    trainer.train()
    seconds = time.perf_counter() - started
    probe = callback.runner.probe
    assert probe is not None
    return {
        "wrapper": type(trainer.model_wrapped).__name__,
        "sharded": any(type(m).__name__.startswith("FSDP") for m in trainer.model.modules()),
        "global_step": trainer.state.global_step,
        "disabled": callback.runner.disabled,
        "alerts": [[a.step, a.rule, a.message] for a in callback.runner.alerts],
        "traces": [trace_record(t) for t in callback.traces],
        "unsharded_initial": unsharded_trace(None, probe),
        "unsharded_final": unsharded_trace(full_state(trainer.model), probe),
        "after_probes": check.after_probes,
        "drift_measurements": DRIFTS["measured"] - drifts,
        "fit_seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--engines", default="ddp,fsdp2")
    parser.add_argument("--max-steps", type=int, default=4)
    options = parser.parse_args()
    fsdp_on_cpu()
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    runs = {}
    for engine in options.engines.split(","):
        reset_accelerate()
        runs[engine] = train(engine, options.out_dir, options.max_steps)
    rank = dist.get_rank()
    record = {"rank": rank, "world_size": dist.get_world_size(), "runs": runs}
    (options.out_dir / f"rank{rank}.json").write_text(json.dumps(record))
    end_distributed_run()


if __name__ == "__main__":
    main()
