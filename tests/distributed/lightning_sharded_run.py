"""Lightning DPO runs of the tiny module under DDP, ``FSDPStrategy`` and ``ModelParallelStrategy``
(gloo, CPU), one after the other in the same processes; launched by ``tests/test_engines_fsdp.py``
under torchrun (``--nproc_per_node 2``, or two agents as two simulated nodes), so Lightning
starts no processes of its own:

    python -m torch.distributed.run ... tests/distributed/lightning_sharded_run.py OUT_DIR
        --strategies ddp,fsdp,model_parallel [--num-nodes 2] [--fail-rank R --fail-from-step S]

Every strategy trains the same tiny Llama (same seed, same data) with ``SpinalCallback`` probing
(and measuring the drift) every 2 steps. For each, every rank records its probe traces, the trace
of the same model unsharded at step 0, the trace of the final weights gathered into an unsharded
copy, the drift measurements that succeeded, and the engine's state after each probe
(``EngineStateCheck``). Each rank writes ``OUT_DIR/rank{r}.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy
from lightning_dpo_ddp_run import TinyDPOModule, pair_batches
from torch import nn

from spinal_callback.demos.tiny import DEFAULT_PROBE_TEXTS, build_tiny_model, build_tiny_tokenizer
from spinal_callback.integrations.lightning import SpinalCallback
from spinal_callback.probe.spinal_probe import SpinalProbe
from spinal_callback.probe.trace import DepthTrace
from tests.distributed.teardown import end_distributed_run

EVERY_N_STEPS = 2
COLLECTIVE_TIMEOUT = timedelta(seconds=60)


class CPUFSDPStrategy(FSDPStrategy):
    """Test only: Lightning passes ``device_id=None`` on the CPU, and FSDP (v1) then refuses
    CPU-only execution; the one change is ``device_id=cpu``."""

    def _setup_model(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel(model, device_id=torch.device("cpu"), **self.kwargs)


class FullyShardedDPOModule(TinyDPOModule):
    """``fully_shard`` on each policy block and on the policy, as ``ModelParallelStrategy``
    expects from ``configure_model``."""

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for block in self.model.model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(self.model, mesh=mesh)


class EngineStateCheck(pl.Callback):
    """After each probe (it follows ``SpinalCallback``): is the engine as a training step left
    it? Records, per probe, the sharded units still holding whole parameters and the units not
    idle (a forward the probe left half done)."""

    def __init__(self) -> None:
        self.wrapper = ""
        self.after_probes: list[dict[str, Any]] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.wrapper = type(trainer.strategy.model).__name__
        self._check(trainer, trainer.global_step)

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step % EVERY_N_STEPS == 0:
            self._check(trainer, trainer.global_step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check(trainer, trainer.global_step)

    def _check(self, trainer: pl.Trainer, step: int) -> None:
        whole, busy = engine_state(trainer.strategy.model)
        self.after_probes.append({"step": step, "whole": whole, "busy": busy})


def engine_state(root: nn.Module) -> tuple[list[str], list[str]]:
    """The sharded units of ``root`` whose parameters are gathered, and those not idle."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel, fully_shard

    whole, busy = [], []
    for name, module in root.named_modules():
        if isinstance(module, FullyShardedDataParallel):
            handle = module._handle
            if handle is not None and not handle.needs_unshard():
                whole.append(name)
            if module.training_state.name != "IDLE" or (
                handle is not None and handle._training_state.name != "IDLE"
            ):
                busy.append(name)
        elif isinstance(module, FSDPModule):
            state = fully_shard.state(module)
            if any(group.is_unsharded for group in state._fsdp_param_groups):
                whole.append(name)
            if state._training_state.name != "IDLE" or state._state_ctx.iter_forward_root:
                busy.append(name)
    return whole, busy


def fail_scores_on_rank(rank: int, from_step: int) -> None:
    """Fault injection: on ``rank``, every probe from ``from_step`` on raises after its
    forward, once its collectives are done (a failure inside them would leave the other ranks
    waiting in them, which no protocol can mend)."""
    run, scores = SpinalProbe.run, SpinalProbe._scores
    current = {"step": 0}

    def run_at(self: SpinalProbe, step: int = 0) -> Any:
        current["step"] = step
        return run(self, step)

    def failing_scores(self: SpinalProbe, *args: Any) -> Any:
        if dist.get_rank() == rank and current["step"] >= from_step:
            raise RuntimeError(f"simulated probe failure on rank {rank}")
        return scores(self, *args)

    SpinalProbe.run = run_at  # type: ignore[method-assign]
    SpinalProbe._scores = failing_scores  # type: ignore[method-assign]


def count_drift_measurements() -> dict[str, int]:
    """How many drift measurements succeeded (a failed one is only logged)."""
    from spinal_callback.probe.drift import DriftMeter

    counts = {"measured": 0}
    measure = DriftMeter.measure

    def counted(self: DriftMeter, *args: Any, **kwargs: Any) -> Any:
        result = measure(self, *args, **kwargs)
        counts["measured"] += 1
        return result

    DriftMeter.measure = counted  # type: ignore[method-assign]
    return counts


DRIFTS = count_drift_measurements()


def strategy_for(name: str) -> pl.strategies.Strategy:
    if name == "ddp":
        return DDPStrategy(process_group_backend="gloo", timeout=COLLECTIVE_TIMEOUT)
    if name == "fsdp":
        block = type(build_tiny_model("llama", vocab_size=300, layers=1).model.layers[0])
        return CPUFSDPStrategy(
            process_group_backend="gloo",
            timeout=COLLECTIVE_TIMEOUT,
            auto_wrap_policy={block},
            use_orig_params=True,
        )
    return ModelParallelStrategy(
        data_parallel_size=dist.get_world_size() if dist.is_initialized() else 2,
        tensor_parallel_size=1,
        process_group_backend="gloo",
        timeout=COLLECTIVE_TIMEOUT,
    )


def trace_record(trace: DepthTrace) -> dict[str, Any]:
    neutral = trace.neutral
    return {
        "step": trace.step,
        "contraction": trace.contraction.tolist(),
        "transport": trace.transport.tolist(),
        "summary": trace.summary,
        "neutral_nll": None if neutral is None else neutral.next_token_nll,
    }


def unsharded_trace(state: dict[str, torch.Tensor] | None, callback: SpinalCallback) -> Any:
    """The probe of a fresh unsharded copy, with ``state`` loaded (``None``: the initial
    weights), over the callback's own probe batches."""
    vocabulary = len(build_tiny_tokenizer())
    model = build_tiny_model("llama", vocab_size=vocabulary, layers=4, seed=0)
    if state is not None:
        model.load_state_dict(state)
    probe = callback.runner.probe
    assert probe is not None
    fresh = SpinalProbe(model, probe.batch, probe.config, probe.neutral_batch, probe.lens_tokens)
    return trace_record(fresh.run(0))


def full_policy_state(trainer: pl.Trainer) -> dict[str, torch.Tensor]:
    """The policy's whole weights on every rank (a collective under every strategy)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True)
    state = get_model_state_dict(trainer.strategy.model, options=options)
    prefix = "model."
    return {k[len(prefix) :]: v.clone() for k, v in state.items() if k.startswith(prefix)}


def fit(name: str, out_dir: Path, max_steps: int, num_nodes: int) -> dict[str, Any]:
    tokenizer = build_tiny_tokenizer()
    pl.seed_everything(0, verbose=False)
    module_class = FullyShardedDPOModule if name == "model_parallel" else TinyDPOModule
    policy = build_tiny_model("llama", vocab_size=len(tokenizer), layers=4, seed=0).train()
    module = module_class(policy)
    callback = SpinalCallback(
        tokenizer=tokenizer,
        probe_texts=list(DEFAULT_PROBE_TEXTS),
        every_n_steps=EVERY_N_STEPS,
        drift_every=1,
    )
    check = EngineStateCheck()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=dist.get_world_size() // num_nodes,
        num_nodes=num_nodes,
        strategy=strategy_for(name),
        max_steps=max_steps,
        default_root_dir=str(out_dir / name),
        logger=False,
        callbacks=[callback, check],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=1,
    )
    started, drifts = time.perf_counter(), DRIFTS["measured"]
    trainer.fit(module, pair_batches())
    seconds = time.perf_counter() - started
    return {
        "strategy": type(trainer.strategy).__name__,
        "wrapped": check.wrapper,
        "after_probes": check.after_probes,
        "global_step": trainer.global_step,
        "disabled": callback.runner.disabled,
        "alerts": [[a.step, a.rule, a.message] for a in callback.runner.alerts],
        "traces": [trace_record(t) for t in callback.traces],
        "unsharded_initial": unsharded_trace(None, callback),
        "unsharded_final": unsharded_trace(full_policy_state(trainer), callback),
        "drift_measurements": DRIFTS["measured"] - drifts,
        "fit_seconds": seconds,
    }


def main() -> None:
    """``--fail-rank R --fail-from-step S``: every probe on rank R from step S on raises
    (``fail_scores_on_rank``)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--strategies", default="ddp,fsdp,model_parallel")
    parser.add_argument("--max-steps", type=int, default=4)
    parser.add_argument("--num-nodes", type=int, default=1)
    parser.add_argument("--fail-rank", type=int, default=None)
    parser.add_argument("--fail-from-step", type=int, default=2)
    options = parser.parse_args()
    if options.fail_rank is not None:
        fail_scores_on_rank(options.fail_rank, options.fail_from_step)
    dist.init_process_group("gloo", timeout=COLLECTIVE_TIMEOUT)
    rank = dist.get_rank()
    runs = {
        name: fit(name, options.out_dir, options.max_steps, options.num_nodes)
        for name in options.strategies.split(",")
    }
    record = {"rank": rank, "world_size": dist.get_world_size(), "runs": runs}
    (options.out_dir / f"rank{rank}.json").write_text(json.dumps(record))
    end_distributed_run()


if __name__ == "__main__":
    main()
