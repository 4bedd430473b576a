"""The probe under DeepSpeed ZeRO: two CPU processes over gloo, run for real, and the ZeRO-3
handling on a single process with parameters marked the way ZeRO-3 marks them.

Real runs (``tests/distributed/deepspeed_*.py``, skipped without ``deepspeed``): TRL's
``DPOTrainer`` with ZeRO-2 and ZeRO-3, HF's ``Trainer`` with ZeRO-3 and Lightning's
``DeepSpeedStrategy`` with ZeRO-3, each beside the same script under plain DDP. Every ZeRO-3 config
sets ``stage3_param_persistence_threshold: 0``, or the tiny model would never be partitioned, and
none has an ``optimizer`` block (the trainer makes the optimizer; DeepSpeed would otherwise compile
an Adam op for minutes). The first launch compiles DeepSpeed's shared-memory op (~17 s, cached).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from spinal_callback.probe.capture import capture_block_outputs, forget_zero3_trace, forward_inputs
from spinal_callback.probe.model_access import resolve_model_parts
from spinal_callback.probe.spinal_probe import ProbeBatch, SpinalProbe, _vocab_size
from tests.test_distributed import WORLD_SIZE, torchrun

LAUNCH_TIMEOUT_S = 240
VOCAB_SIZE = 384  # len(build_tiny_tokenizer())
PROBE_STEPS = [0, 2, 4]
DEEPSPEED_RUNS = [("trl", 2), ("trl", 3), ("hf", 3), ("lightning", 3)]
NEEDS = {"trl": ("trl", "datasets"), "hf": ("datasets",), "lightning": ("lightning",)}


def missing_modules(*names: str) -> list[str]:
    return [name for name in names if importlib.util.find_spec(name) is None]


def launch(trainer: str, zero: int, out_dir: Path) -> list[dict[str, Any]]:
    """One two-process run under torchrun; the records of both ranks."""
    missing = missing_modules(*NEEDS[trainer], *(("deepspeed",) if zero else ()))
    if missing:
        pytest.skip(f"needs {', '.join(missing)}; `make test-dist` installs it")
    script = "deepspeed_lightning_run.py" if trainer == "lightning" else "deepspeed_trainer_run.py"
    options = ["--zero", str(zero)] + ([] if trainer == "lightning" else ["--trainer", trainer])
    return torchrun(script, out_dir, *options, timeout=LAUNCH_TIMEOUT_S)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``runs(trainer, zero)``: the rank records of that run, launched once per module."""
    done: dict[tuple[str, int], list[dict[str, Any]]] = {}

    def get(trainer: str, zero: int) -> list[dict[str, Any]]:
        if (trainer, zero) not in done:
            out_dir = tmp_path_factory.mktemp(f"{trainer}_zero{zero}")
            done[trainer, zero] = launch(trainer, zero, out_dir)
        return done[trainer, zero]

    return get


def trace_values(trace: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Every compared number of a trace record (and its neutral trace), by name."""
    values = {
        f"{prefix}{key}[{i}]": value
        for key in ("contraction", "transport", "lens_entropy")
        for i, value in enumerate(trace[key])
    }
    values.update({f"{prefix}{name}": value for name, value in trace["summary"].items()})
    if "neutral" in trace:
        values.update(trace_values(trace["neutral"], "neutral."))
    return values


def largest_difference(trace: dict[str, Any], reference: dict[str, Any]) -> float:
    assert trace["layers"] == reference["layers"]
    values, expected = trace_values(trace), trace_values(reference)
    assert values.keys() == expected.keys()
    return max(abs(values[name] - expected[name]) for name in values)


deepspeed_runs = pytest.mark.parametrize(
    ("trainer", "zero"), DEEPSPEED_RUNS, ids=[f"{t}-zero{z}" for t, z in DEEPSPEED_RUNS]
)


# --- real two-process runs ---------------------------------------------------------------------


@pytest.mark.slow
@deepspeed_runs
def test_deepspeed_run_trains_every_step_and_probes_on_every_rank(
    runs: Any, trainer: str, zero: int
) -> None:
    records = runs(trainer, zero)
    assert [r["engine"] for r in records] == ["DeepSpeedEngine"] * WORLD_SIZE
    assert [r["global_step"] for r in records] == [4] * WORLD_SIZE
    assert [r["disabled"] for r in records] == [False] * WORLD_SIZE
    assert [[t["step"] for t in r["traces"]] for r in records] == [PROBE_STEPS] * WORLD_SIZE
    assert [r["traces"][0]["vocab_size"] for r in records] == [VOCAB_SIZE] * WORLD_SIZE


@pytest.mark.slow
@deepspeed_runs
def test_deepspeed_probe_matches_the_unsharded_model_on_every_rank(
    runs: Any, trainer: str, zero: int
) -> None:
    for record in runs(trainer, zero):
        first, last = record["traces"][0], record["traces"][-1]
        assert largest_difference(first, record["unsharded_initial"]) <= 1e-6
        assert largest_difference(last, record["unsharded_final"]) <= 1e-6
        if trainer == "trl":  # the reference, in an inference engine of its own
            assert (
                largest_difference(record["reference_trace"], record["unsharded_initial"]) <= 1e-6
            )


@pytest.mark.slow
@deepspeed_runs
def test_deepspeed_probe_matches_ddp_on_every_rank(runs: Any, trainer: str, zero: int) -> None:
    """The same weights at step 0 give the same trace; after training, ZeRO's reductions add
    float32 rounding to the weights (~1e-6), which the traces carry (measured up to 2e-5)."""
    for record, ddp in zip(runs(trainer, zero), runs(trainer, 0)):
        assert ddp["engine"] == "DistributedDataParallel"
        first, *trained = zip(record["traces"], ddp["traces"])
        assert largest_difference(*first) <= 1e-6
        assert max(largest_difference(*pair) for pair in trained) <= 2e-4


@pytest.mark.slow
@deepspeed_runs
def test_deepspeed_ranks_record_identical_traces(runs: Any, trainer: str, zero: int) -> None:
    first, second = runs(trainer, zero)
    assert first["traces"] == second["traces"]


@pytest.mark.slow
@deepspeed_runs
def test_deepspeed_probe_leaves_no_parameter_gathered_and_no_forward_open(
    runs: Any, trainer: str, zero: int
) -> None:
    for record in runs(trainer, zero):
        states = record["engine_states"]
        before = [s for s in states if s["when"] == "before"]
        after = [s for s in states if s["when"] == "after"]
        assert [s["step"] for s in after] == PROBE_STEPS
        if zero == 3:
            assert all(s["partitioned"] > 0 for s in after)
        assert [s["gathered"] for s in after] == [[]] * len(PROBE_STEPS)
        assert [s["in_forward"] for s in after] == [[]] * len(PROBE_STEPS)
        # TRL's training step itself grows DeepSpeed's module stack; the probe must not.
        assert [s["module_stack"] for s in after] == [s["module_stack"] for s in before]


# --- ZeRO-3 handling, single process -----------------------------------------------------------


def mark_partitioned(model: nn.Module, head_weight_storage: bool = True) -> None:
    """Mark ``model``'s parameters the way ZeRO-3 does (``ds_id``, ``ds_shape``); without
    ``head_weight_storage`` the head's weight keeps no local values, as a partition on a rank
    that holds none of it."""
    for index, parameter in enumerate(model.parameters()):
        parameter.ds_id = index  # type: ignore[attr-defined]
        parameter.ds_shape = parameter.shape  # type: ignore[attr-defined]
    if not head_weight_storage:
        head = model.get_output_embeddings()  # type: ignore[operator]
        head.weight.data = torch.empty(0)


def test_vocab_size_comes_from_the_head_not_its_partitioned_weight(llama: nn.Module) -> None:
    mark_partitioned(llama, head_weight_storage=False)
    parts = resolve_model_parts(llama)
    assert parts.zero3_partitioned
    assert _vocab_size(parts, torch.zeros(1, 1, 64)) == VOCAB_SIZE


def test_vocab_size_comes_from_ds_shape_when_the_head_has_no_out_features() -> None:
    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.empty(0))
            self.weight.ds_shape = torch.Size([VOCAB_SIZE, 64])  # type: ignore[attr-defined]

    parts = type("Parts", (), {"head": Head()})()
    assert _vocab_size(parts, torch.zeros(1, 1, 64)) == VOCAB_SIZE  # type: ignore[arg-type]


def test_a_partitioned_head_is_called_as_a_module_not_multiplied_by_its_weight(
    llama: nn.Module,
) -> None:
    mark_partitioned(llama)
    assert resolve_model_parts(llama).head_weight_as(torch.bfloat16, torch.device("cpu")) is None


def test_a_zero3_forward_runs_to_the_end_with_one_position_of_logits(
    llama: nn.Module, probe_batch: ProbeBatch
) -> None:
    mark_partitioned(llama)
    parts = resolve_model_parts(llama)
    ended: list[tuple[int, ...]] = []
    llama.register_forward_hook(lambda module, args, output: ended.append(output.logits.shape))
    rows = torch.arange(3)
    (hidden,) = capture_block_outputs(parts, forward_inputs(parts, probe_batch), [1, 2], [rows])
    assert hidden.shape == (2, 3, 64)
    assert ended == [(probe_batch.input_ids.shape[0], 1, VOCAB_SIZE)]


def test_an_unpartitioned_forward_still_stops_after_the_deepest_traced_block(
    llama: nn.Module, probe_batch: ProbeBatch
) -> None:
    parts = resolve_model_parts(llama)
    ended: list[object] = []
    llama.register_forward_hook(lambda module, args, output: ended.append(output))
    inputs = forward_inputs(parts, probe_batch)
    capture_block_outputs(parts, inputs, [1, 2], [torch.arange(3)])
    assert ended == []


class FakeCoordinator:
    """The two methods of DeepSpeed's ``PartitionedParameterCoordinator`` the probe calls."""

    def __init__(self) -> None:
        self.invalid = False
        self.invalidations = 0

    def is_invalid_trace(self) -> bool:
        return self.invalid

    def _invalidate_trace(self) -> None:
        self.invalid, self.invalidations = True, self.invalidations + 1


class FakeOffload:
    """Stands for ``DeepSpeedZeRoOffload``, whose forward hooks close over it."""

    def __init__(self, model: nn.Module) -> None:
        self.coordinator = FakeCoordinator()
        offload = self

        def pre_forward_hook(module: nn.Module, *args: Any) -> None:
            offload.get_param_coordinator()

        for module in model.modules():
            module.register_forward_pre_hook(pre_forward_hook)

    def get_param_coordinator(self) -> FakeCoordinator:
        return self.coordinator


def test_a_zero3_probe_leaves_the_module_order_trace_for_training_to_record(
    llama: nn.Module, probe_batch: ProbeBatch
) -> None:
    offload = FakeOffload(llama)
    mark_partitioned(llama)
    SpinalProbe(llama, probe_batch).run()
    # Invalidated before the forward (so it frees each module's parameters at once) and left
    # invalid after it, so that the next training step records its own trace.
    assert offload.coordinator.invalid
    assert offload.coordinator.invalidations == 1


def model_state(model: nn.Module) -> dict[str, Any]:
    """What a no-op must leave alone, comparable with ``==``: each module's class, mode, hooks
    and attribute names, and each parameter's and buffer's identity, dtype and shape (their
    values are compared apart)."""
    return {
        name: (
            type(module),
            module.training,
            list(module._forward_pre_hooks.items()),
            list(module._forward_hooks.items()),
            sorted(vars(module)),
            [(n, id(t), t.dtype, t.shape) for n, t in module.named_parameters(recurse=False)],
            [(n, id(t), t.dtype, t.shape) for n, t in module.named_buffers(recurse=False)],
        )
        for name, module in model.named_modules()
    }


def test_forgetting_the_trace_of_a_model_without_zero3_hooks_does_nothing(
    llama: nn.Module,
) -> None:
    # A hook of the user's own, over an object with a trace to invalidate but no
    # `get_param_coordinator`: not DeepSpeed's, so not to be touched.
    lookalike = FakeCoordinator()
    llama.get_submodule("model.layers.0").register_forward_pre_hook(
        lambda module, args: lookalike.is_invalid_trace()
    )
    before = model_state(llama)
    values = {name: tensor.clone() for name, tensor in llama.state_dict().items()}
    forget_zero3_trace(llama)
    assert model_state(llama) == before
    after = llama.state_dict()
    assert after.keys() == values.keys()
    for name, tensor in values.items():
        torch.testing.assert_close(after[name], tensor, rtol=0, atol=0, msg=name)
    assert (lookalike.invalid, lookalike.invalidations) == (False, 0)


def test_a_zero3_probe_calls_the_peft_model_the_engine_wraps(llama: nn.Module) -> None:
    peft = pytest.importorskip("peft")
    wrapped = peft.get_peft_model(llama, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    parts = resolve_model_parts(wrapped)
    assert parts.forward_entry() is parts.model  # unpartitioned: the LM itself, as before
    mark_partitioned(wrapped)
    assert parts.forward_entry() is wrapped
