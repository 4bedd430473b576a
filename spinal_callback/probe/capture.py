"""The probe's forward: hooks on chosen decoder blocks that capture their outputs, then stop.

Shared by ``SpinalProbe`` (late blocks) and ``drift`` (every block). The caller picks the grad,
eval and autocast modes with ``eval_mode`` and ``autocast_context``.

Under DeepSpeed ZeRO-3 the forward is not stopped: the engine's forward hooks keep state (its
"in forward" flag, which makes any read of a partitioned parameter gather it on the spot, its
parameter coordinator and timers) that only the end of the forward clears. Such a forward runs to
the end, computing the logits of one position only where the model allows it (``logits_to_keep``).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from spinal_callback.probe.batch import ProbeBatch
from spinal_callback.probe.model_access import ModelParts


class _StopForward(Exception):
    """Raised by the last hooked block: nothing after it is needed."""


def forward_inputs(
    parts: ModelParts,
    batch: ProbeBatch,
    rows: slice = slice(None),
    columns: slice = slice(None),
) -> dict[str, Tensor]:
    """Keyword inputs of a probe forward over ``batch[rows, columns]``, on the CPU: int64
    ``[b, t]`` ``input_ids`` and ``attention_mask``, and ``position_ids`` counted over real
    tokens (so left padding shifts nothing) where the model's forward accepts them."""
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    if "position_ids" in inspect.signature(parts.model.forward).parameters:
        inputs["position_ids"] = batch.position_ids
    return {name: value[rows, columns] for name, value in inputs.items()}


def capture_block_outputs(
    parts: ModelParts,
    inputs: dict[str, Tensor],
    layers: Sequence[int],
    selections: Sequence[Tensor],
) -> list[Tensor]:
    """Run ``parts.forward_entry()(**inputs, use_cache=False)`` with forward hooks on blocks
    ``layers``.

    The forward stops after the deepest hooked block (nothing after it runs), except under
    DeepSpeed ZeRO-3 (``ModelParts.zero3_partitioned``), where it runs to the end so that the
    engine's end-of-forward hooks clear its state. Every hook is removed afterwards, also when
    the forward raises. The caller chooses grad, eval and autocast modes.

    Args:
        parts: the resolved model.
        inputs: ``forward_inputs`` on the model's device.
        layers: ascending block indices.
        selections: int64 flat token indices into ``[b * t]``, on the model's device.

    Returns:
        One tensor ``[len(layers), n_k, d]`` per selection, in the blocks' output dtype.

    Raises:
        RuntimeError: the forward skipped one of ``layers`` (early exit or layer dropout).
    """
    captured: dict[int, list[Tensor]] = {}
    last = max(layers)
    stop = not parts.zero3_partitioned

    def hook_for(layer: int) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            flat = hidden.reshape(-1, hidden.shape[-1])
            captured[layer] = [flat.index_select(0, rows) for rows in selections]
            if stop and layer == last:
                raise _StopForward

        return hook

    keywords: dict[str, Any] = {"use_cache": False}
    if not stop and "logits_to_keep" in inspect.signature(parts.model.forward).parameters:
        keywords["logits_to_keep"] = 1
    with _block_hooks(parts, {i: hook_for(i) for i in layers}), contextlib.suppress(_StopForward):
        parts.forward_entry()(**inputs, **keywords)
    missing = [i for i in layers if i not in captured]
    if missing:
        raise RuntimeError(
            f"the forward never reached block(s) {missing}; the model skipped them "
            "(early exit or layer dropout): trace blocks that always run (late_layers)"
        )
    return [torch.stack([captured[i][k] for i in layers]) for k in range(len(selections))]


def lens_and_model_logits(
    parts: ModelParts, inputs: dict[str, Tensor]
) -> tuple[Tensor, Tensor | None]:
    """Run the whole forward of ``parts.forward_entry()``; the lens of its last block, taken in
    a hook while the forward runs, and the logits the model returns.

    Inside the forward a sharding engine has the root unit's parameters (final norm, head)
    gathered, so the lens needs nothing of its own. The caller chooses grad, eval and autocast
    modes.

    Args:
        parts: the resolved model.
        inputs: ``forward_inputs`` on the model's device, ``[b, t]``.

    Returns:
        ``parts.lens_logits`` of the last block's output ``[b, t, V]``, and the logits the
        model returns ``[b, t, V]`` (``None`` from a model that returns none, e.g. a fused loss
        head).
    """
    lens: list[Tensor] = []

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        lens.append(parts.lens_logits(output[0] if isinstance(output, (tuple, list)) else output))

    with _block_hooks(parts, {parts.num_blocks - 1: hook}):
        output = parts.forward_entry()(**inputs, use_cache=False)
    if not lens:
        raise RuntimeError("the forward never reached the last block (early exit?)")
    logits = output[0] if isinstance(output, tuple) else getattr(output, "logits", None)
    return lens[-1], logits


@contextlib.contextmanager
def _block_hooks(parts: ModelParts, hooks: dict[int, Any]) -> Iterator[None]:
    """Forward hooks on blocks ``hooks`` (block index -> hook) for the duration, removed also
    when the forward raises. Under ZeRO-3 the engine's module-order trace is dropped before and
    after: untraced, ZeRO-3 releases each module's parameters right after the module ran;
    following a training trace it would keep those the trace reuses soon gathered."""
    zero3 = parts.zero3_partitioned
    if zero3:
        forget_zero3_trace(parts.model)
    handles = [parts.blocks[i].register_forward_hook(hook) for i, hook in hooks.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        if zero3:
            forget_zero3_trace(parts.model)


def forget_zero3_trace(model: nn.Module) -> None:
    """Drop DeepSpeed ZeRO-3's module-order trace, before and after a probe's forward.

    ZeRO-3's parameter coordinator records the order in which the first forward (and backward)
    after a reset calls the modules, and from then on prefetches and releases parameters by that
    order. A probe's forward (eval, no backward, then the lens calling the norm and head) must
    neither run to the training trace (it would leave the parameters that the trace's backward
    reuses soon gathered) nor become the trace (a training step run to the probe's order releases
    parameters its backward still needs: seen with TRL's fused log-prob head). Invalidated, the
    trace is re-recorded by the next training step, as DeepSpeed does whenever the module order
    changes. Every rank probes alike, so the coordinators stay in step. A no-op for a model
    without ZeRO-3 hooks.
    """
    for coordinator in _zero3_coordinators(model):
        if not coordinator.is_invalid_trace():
            coordinator._invalidate_trace()


def _zero3_coordinators(model: nn.Module) -> list[Any]:
    """The parameter coordinators of the DeepSpeed ZeRO-3 engines whose forward hooks sit on
    ``model``'s modules.

    DeepSpeed keeps no reference from a module to its engine; its per-module forward hooks are
    closures over the engine's ``DeepSpeedZeRoOffload``, which owns the coordinator.
    """
    owners: dict[int, Any] = {}
    for module in model.modules():
        for hook in module._forward_pre_hooks.values():
            owner = _closure_object_with(hook, "get_param_coordinator")
            if owner is not None:
                owners[id(owner)] = owner
        if owners:
            break  # every module of one engine is hooked by the same owner
    return [owner.get_param_coordinator() for owner in owners.values()]


def _closure_object_with(function: Any, method: str, depth: int = 3) -> Any:
    """An object with a callable ``method`` among ``function``'s closure variables, looked for
    through wrapping decorators (``__wrapped__`` and closures) ``depth`` levels deep."""
    pending = [(function, 0)]
    while pending:
        current, level = pending.pop()
        inner = getattr(current, "__wrapped__", None)
        if inner is not None and level < depth:
            pending.append((inner, level + 1))
        for cell in getattr(current, "__closure__", None) or ():
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            if callable(getattr(value, method, None)):
                return value
            if callable(value) and level < depth:
                pending.append((value, level + 1))
    return None


def autocast_context(
    device: torch.device, dtype_name: str | None
) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` to ``dtype_name`` (``"bfloat16"``/``"float16"``) on ``device``, or a
    no-op for ``None`` (an enclosing autocast still applies)."""
    if dtype_name is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, dtype_name))


def lens_cast(hidden: Tensor, lens_dtype: str) -> torch.dtype | None:
    """The dtype the logit lens over ``hidden`` multiplies in (``SpinalConfig.lens_dtype``), or
    ``None`` to keep the forward's precision.

    ``"bfloat16"``: bfloat16; ``"auto"``: bfloat16 when ``hidden`` is float32 on a CPU with native
    bfloat16 matrix instructions; ``"native"``: ``None``.
    """
    wanted = lens_dtype == "bfloat16" or (
        lens_dtype == "auto"
        and hidden.device.type == "cpu"
        and hidden.dtype == torch.float32
        and cpu_has_native_bfloat16()
    )
    return torch.bfloat16 if wanted else None


NATIVE_BFLOAT16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
"""x86 CPU flags of bfloat16 matrix instructions (``/proc/cpuinfo``)."""


@functools.cache
def cpu_has_native_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices natively (AVX-512 BF16 or AMX), read from
    its flags in ``/proc/cpuinfo``. oneDNN's own check also says yes on any AVX-512 CPU, where it
    emulates bfloat16, measured 4x slower than float32 at the lens's shapes on a Xeon without
    AVX-512 BF16. ``False`` where the flags cannot be read (not Linux): float32 is never slow."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            return has_native_bfloat16_flags(cpuinfo.read())
    except OSError:
        return False


def has_native_bfloat16_flags(cpuinfo: str) -> bool:
    """Whether a ``/proc/cpuinfo`` text lists a bfloat16 matrix instruction set
    (``NATIVE_BFLOAT16_FLAGS``) on its ``flags`` lines."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags" and NATIVE_BFLOAT16_FLAGS & set(value.split()):
            return True
    return False


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the duration; every submodule's own train/eval flag restored afterwards."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def device_of(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (the CPU for a model without parameters)."""
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")
