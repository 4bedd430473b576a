"""What the DeepSpeed runs under ``tests/distributed/`` share: trace records, the engine-state
check after a probe, and an unsharded copy of a (possibly ZeRO-3 partitioned) model's weights.

Imported by ``deepspeed_trainer_run.py`` and ``deepspeed_lightning_run.py``, which run with the
repository on ``PYTHONPATH``. Nothing here imports DeepSpeed at module level, so the DDP runs the
DeepSpeed runs are compared with need no DeepSpeed.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from spinal_callback.demos.tiny import DEFAULT_PROBE_TEXTS
from spinal_callback.probe.spinal_probe import SpinalProbe

PROBE_TEXTS = list(DEFAULT_PROBE_TEXTS)
EVERY_N_STEPS = 2


def trace_record(trace: Any) -> dict[str, Any]:
    """The compared values of a ``DepthTrace``, as JSON."""
    record = {
        "step": trace.step,
        "layers": trace.layers,
        "contraction": trace.contraction.tolist(),
        "transport": trace.transport.tolist(),
        "lens_entropy": trace.lens_entropy.tolist(),
        "summary": trace.summary,
        "vocab_size": trace.metadata.get("vocab_size"),
    }
    if trace.neutral is not None:
        record["neutral"] = trace_record(trace.neutral)
    return record


def unsharded_trace(model: nn.Module, probe: SpinalProbe, step: int) -> dict[str, Any]:
    """The trace of a plain (unwrapped, unsharded) ``model`` under the callback's own ``probe``
    (same texts, neutral texts, settings and lens tokens: under ZeRO-3 the head is called as a
    module, and such a lens takes every sample token)."""
    plain = SpinalProbe(model, probe.batch, probe.config, probe.neutral_batch, probe.lens_tokens)
    return trace_record(plain.run(step))


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s whole weights on every rank; ZeRO-3 partitions are gathered (a collective
    every rank joins) and released again."""
    partitioned = [p for p in model.parameters() if hasattr(p, "ds_id")]
    gathered: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if partitioned:
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)
    with gathered:
        return {name: value.detach().clone() for name, value in model.state_dict().items()}


def engine_state(model: nn.Module) -> dict[str, Any]:
    """What a probe must leave as it found it: ZeRO-3 parameters left gathered, modules still
    flagged "in forward", and the depth of DeepSpeed's stack of modules in a forward."""
    gathered = [
        name
        for name, p in model.named_parameters()
        if hasattr(p, "ds_status") and p.ds_status.name != "NOT_AVAILABLE"
    ]
    in_forward = [
        name
        for name, module in model.named_modules()
        if getattr(module._parameters, "_in_forward", False)
    ]
    stack = None
    with contextlib.suppress(ImportError):
        from deepspeed.runtime.zero import parameter_offload

        stack = len(parameter_offload.FWD_MODULE_STACK)
    return {
        "partitioned": sum(hasattr(p, "ds_id") for p in model.parameters()),
        "gathered": gathered,
        "in_forward": in_forward,
        "module_stack": stack,
    }


def zero_config(stage: int, micro_batch: int | None = None) -> dict[str, Any]:
    """A DeepSpeed config without an ``optimizer`` block (the trainer makes the optimizer, so
    DeepSpeed compiles no Adam op); every ZeRO-3 parameter partitioned, however small.

    ``micro_batch``: the batch per rank, for Lightning (whose pre-batched loader it cannot read);
    ``None``: the batch sizes and clipping are ``"auto"``, which HF's trainer fills in from its
    arguments (TRL's reference-model engine needs them).
    """
    zero: dict[str, Any] = {"stage": stage}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = 0
    config: dict[str, Any] = {"zero_optimization": zero}
    if micro_batch is not None:
        config["train_micro_batch_size_per_gpu"] = micro_batch
        return config
    for key in (
        "train_batch_size",
        "train_micro_batch_size_per_gpu",
        "gradient_accumulation_steps",
        "gradient_clipping",
    ):
        config[key] = "auto"
    return config
