"""Per-layer drift: the math, the hooked forward, the session's schedule, reference and state,
and both training callbacks."""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter
from transformers import PreTrainedModel, PreTrainedTokenizerFast, TrainerCallback

from spinal_callback.config import SpinalConfig
from spinal_callback.outputs.sinks import Outputs
from spinal_callback.outputs.tensorboard import TraceBoard, custom_scalar_layout
from spinal_callback.probe.drift import (
    activation_drift,
    block_outputs,
    decode_activations,
    drift_scalars,
    encode_activations,
)
from spinal_callback.probe.spinal_probe import ProbeBatch
from spinal_callback.training.runner import Runner

DRIFT_TAGS = [f"spinal/drift/L{block:02d}" for block in range(4)]


def perturb_mlp(model: PreTrainedModel, block: int, scale: float = 0.05) -> None:
    """Add noise to block ``block``'s MLP output projection only."""
    with torch.no_grad():
        weight = model.model.layers[block].mlp.down_proj.weight
        weight.add_(scale * torch.randn_like(weight))


def make_session(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerFast,
    probe_texts: list[str],
    reference: torch.nn.Module | None = None,
    **overrides: Any,
) -> Runner:
    session = Runner(SpinalConfig(every_n_steps=1, **overrides), probe_texts)
    session.setup(model, tokenizer, reference_model=reference)
    return session


def drift_logged(session: Runner) -> dict[str, float]:
    return {k: v for k, v in session.pop_scalars().items() if k.startswith("spinal/drift/")}


def read_scalars(log_dir: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return accumulator


def drift_steps(events: EventAccumulator) -> dict[str, list[int]]:
    tags = [tag for tag in events.Tags()["scalars"] if tag.startswith("spinal/drift/")]
    return {tag: [event.step for event in events.Scalars(tag)] for tag in sorted(tags)}


# The math


def test_drift_of_identical_activations_is_exactly_zero() -> None:
    activations = torch.randn(3, 5, 8)
    assert torch.equal(activation_drift(activations, activations.clone()), torch.zeros(3))


def test_drift_is_mean_distance_over_mean_reference_norm() -> None:
    reference = torch.tensor([[[3.0, 4.0], [0.0, 1.0]], [[6.0, 8.0], [0.0, 2.0]]])
    moved = torch.tensor([[[0.0, 0.0], [0.0, 3.0]], [[3.0, 4.0], [3.0, 4.0]]])
    # block 0: distances 0 and 3, norms 5 and 1 -> 1.5 / 3; block 1: 5 and 5, 10 and 2 -> 5 / 6.
    expected = torch.tensor([0.5, 5.0 / 6.0])
    torch.testing.assert_close(activation_drift(reference + moved, reference), expected)


def test_drift_is_computed_in_float32() -> None:
    activations = torch.randn(2, 4, 8, dtype=torch.bfloat16)
    assert activation_drift(activations + 1, activations).dtype == torch.float32


def test_drift_of_mismatched_shapes_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"one \[blocks, tokens, hidden\] shape.*\(2, 3, 4\)"):
        activation_drift(torch.zeros(2, 3, 4), torch.zeros(2, 5, 4))


def test_drift_scalars_name_every_block_zero_padded() -> None:
    assert list(drift_scalars(torch.zeros(4))) == DRIFT_TAGS
    names = list(drift_scalars(torch.zeros(120)))
    assert names[0] == "spinal/drift/L000" and names[-1] == "spinal/drift/L119"


def test_stored_activations_decode_to_the_same_tensor() -> None:
    activations = torch.randn(4, 7, 16)
    encoded = json.loads(json.dumps(encode_activations(activations)))
    assert torch.equal(decode_activations(encoded), activations)


def test_the_drift_chart_is_in_the_layout_only_when_drift_is_on() -> None:
    def charts(drift: bool) -> dict[str, Any]:
        return custom_scalar_layout([4, 5, 6, 7], drift)[
            "SPINAL depth trace (a line per late block)"
        ]

    assert charts(True)["drift from the reference, all blocks"] == [
        "Multiline",
        [r"^spinal/drift/L\d+$"],
    ]
    assert not any("drift" in title for title in charts(False))


# The hooked forward


def test_block_outputs_are_the_hidden_states_after_each_block(
    make_model: Callable[..., PreTrainedModel], probe_batch: ProbeBatch
) -> None:
    model = make_model("llama", layers=4)
    index = probe_batch.subsample(64, seed=2)
    outputs = block_outputs(model, probe_batch, index)
    with torch.no_grad():
        hidden_states = model(
            input_ids=probe_batch.input_ids,
            attention_mask=probe_batch.attention_mask,
            output_hidden_states=True,
        ).hidden_states
    assert outputs.shape == (4, 64, 64) and outputs.dtype == torch.float32
    # hidden_states[-1] is after the final norm, so compare the blocks before the last.
    for block in range(3):
        expected = hidden_states[block + 1].reshape(-1, 64)[index]
        torch.testing.assert_close(outputs[block], expected, rtol=1e-5, atol=1e-5)


def test_block_outputs_do_not_depend_on_the_padding_side(
    make_model: Callable[..., PreTrainedModel],
    tokenizer: PreTrainedTokenizerFast,
    probe_texts: list[str],
) -> None:
    model = make_model("llama", layers=4)
    right = ProbeBatch.from_texts(tokenizer, probe_texts, padding_side="right")
    left = ProbeBatch.from_texts(tokenizer, probe_texts, padding_side="left")
    torch.testing.assert_close(
        block_outputs(model, left, left.subsample(64, seed=2)),
        block_outputs(model, right, right.subsample(64, seed=2)),
        rtol=1e-4,
        atol=1e-4,
    )


def test_block_outputs_restore_training_mode_and_leave_no_hooks(
    make_model: Callable[..., PreTrainedModel], probe_batch: ProbeBatch
) -> None:
    model = make_model("llama", layers=4).train()
    calls: list[str] = []
    model.lm_head.register_forward_hook(lambda *args: calls.append("lm_head"))
    block_outputs(model, probe_batch, probe_batch.subsample(32, seed=2))
    assert model.training and calls == []
    assert all(not block._forward_hooks for block in model.model.layers)


def test_a_planted_change_in_one_block_drifts_that_block_and_the_ones_after(
    make_model: Callable[..., PreTrainedModel], probe_batch: ProbeBatch
) -> None:
    reference = make_model("llama", layers=4)
    policy = copy.deepcopy(reference)
    perturb_mlp(policy, block=2)
    index = probe_batch.subsample(128, seed=2)
    drift = activation_drift(
        block_outputs(policy, probe_batch, index), block_outputs(reference, probe_batch, index)
    )
    torch.testing.assert_close(drift[:2], torch.zeros(2), rtol=0, atol=1e-6)
    assert (drift[2:] > 1e-3).all()


# The session: schedule, reference, failures, state


def test_drift_is_measured_at_the_first_probe_and_every_drift_every_th_after(
    llama: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, probe_texts: list[str]
) -> None:
    session = make_session(llama, tokenizer, probe_texts, drift_every=3)
    measured = []
    for step in range(7):
        session.step(step)
        measured.append(bool(drift_logged(session)))
    assert measured == [True, False, False, True, False, False, True]


def test_drift_covers_every_block_not_only_the_late_band(
    llama: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, probe_texts: list[str]
) -> None:
    session = make_session(llama, tokenizer, probe_texts, drift_every=1)
    session.step(0)
    assert session.traces[-1].layers == [4, 5, 6, 7]
    assert list(drift_logged(session)) == [f"spinal/drift/L{block:02d}" for block in range(8)]


def test_without_a_reference_the_first_measurement_is_the_baseline(
    make_model: Callable[..., PreTrainedModel],
    tokenizer: PreTrainedTokenizerFast,
    probe_texts: list[str],
) -> None:
    policy = make_model("llama", layers=4)
    session = make_session(policy, tokenizer, probe_texts, drift_every=1)
    session.step(0)
    assert set(drift_logged(session).values()) == {0.0}
    perturb_mlp(policy, block=2)
    session.step(1)
    drift = drift_logged(session)
    assert drift["spinal/drift/L01"] == 0.0 and drift["spinal/drift/L02"] > 1e-3


def test_the_reference_model_is_the_baseline_from_the_first_measurement(
    make_model: Callable[..., PreTrainedModel],
    tokenizer: PreTrainedTokenizerFast,
    probe_texts: list[str],
) -> None:
    reference = make_model("llama", layers=4)
    policy = copy.deepcopy(reference)
    perturb_mlp(policy, block=2)
    session = make_session(policy, tokenizer, probe_texts, reference, drift_every=1)
    session.step(0)
    drift = drift_logged(session)
    assert drift["spinal/drift/L01"] == pytest.approx(0.0, abs=1e-6)
    assert drift["spinal/drift/L02"] > 1e-3


def test_a_lora_policy_drifts_from_itself_with_adapters_disabled(
    make_model: Callable[..., PreTrainedModel],
    tokenizer: PreTrainedTokenizerFast,
    probe_texts: list[str],
) -> None:
    from peft import LoraConfig, get_peft_model

    policy = get_peft_model(
        make_model("llama", layers=4), LoraConfig(r=4, target_modules=["down_proj"])
    )
    with torch.no_grad():
        lora_b = policy.base_model.model.model.layers[2].mlp.down_proj.lora_B["default"].weight
        lora_b.normal_(std=0.05)
    session = make_session(policy, tokenizer, probe_texts, drift_every=1)
    session.step(0)
    drift = drift_logged(session)
    assert drift["spinal/drift/L01"] == pytest.approx(0.0, abs=1e-6)
    assert drift["spinal/drift/L02"] > 1e-3


def test_the_reference_is_measured_once(
    make_model: Callable[..., PreTrainedModel],
    tokenizer: PreTrainedTokenizerFast,
    probe_texts: list[str],
) -> None:
    reference = make_model("llama", layers=4)
    policy = copy.deepcopy(reference)
    session = make_session(policy, tokenizer, probe_texts, reference, drift_every=1)
    forwards: list[int] = []
    reference.register_forward_pre_hook(lambda *args: forwards.append(1))
    for step in range(3):
        session.step(step)
    # At the first probe: the lens check, one reference depth trace and one drift measurement.
    assert len(forwards) == 3
    assert session.drift.reference is not None
    assert session.drift.reference.device.type == "cpu"
    assert session.drift.reference.dtype == torch.float32


@pytest.mark.fault
def test_a_failing_drift_measurement_is_logged_and_skipped(
    llama: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    probe_texts: list[str],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def out_of_memory(*args: Any, **kwargs: Any) -> torch.Tensor:
        raise torch.OutOfMemoryError("simulated out of memory")

    session = make_session(llama, tokenizer, probe_texts, drift_every=1)
    with monkeypatch.context() as patch:
        patch.setattr("spinal_callback.probe.drift.block_outputs", out_of_memory)
        with caplog.at_level(logging.ERROR, logger="spinal_callback"):
            session.step(0)
    assert len(session.traces) == 1 and drift_logged(session) == {}
    assert "drift measurement failed" in caplog.text
    assert not session.disabled and not session.alerts
    session.step(1)
    assert len(drift_logged(session)) == 8


def test_a_policy_snapshot_reference_is_stored_and_restored_exactly(
    make_model: Callable[..., PreTrainedModel],
    tokenizer: PreTrainedTokenizerFast,
    probe_texts: list[str],
) -> None:
    policy = make_model("llama", layers=4)
    first = make_session(policy, tokenizer, probe_texts, drift_every=1)
    first.step(0)  # no reference model: the policy now is the reference
    state = json.loads(json.dumps(first.state_dict()))
    assert state["drift"] is not None
    perturb_mlp(policy, block=1)
    first.step(1)
    # Without the stored snapshot the resumed run would take this perturbed policy as the
    # baseline and report no drift.
    resumed = make_session(policy, tokenizer, probe_texts, drift_every=1)
    resumed.load_state_dict(state)
    resumed.step(1)
    assert first.drift is not None and resumed.drift is not None
    assert torch.equal(resumed.drift.last, first.drift.last)
    assert resumed.drift.last[1] > 1e-3


def test_a_reference_model_is_measured_again_after_resume_not_stored(
    make_model: Callable[..., PreTrainedModel],
    tokenizer: PreTrainedTokenizerFast,
    probe_texts: list[str],
) -> None:
    reference = make_model("llama", layers=4)
    policy = copy.deepcopy(reference)
    first = make_session(policy, tokenizer, probe_texts, reference, drift_every=1)
    first.step(0)
    state = json.loads(json.dumps(first.state_dict()))
    assert state["drift"] is None
    perturb_mlp(policy, block=1)
    first.step(1)
    resumed = make_session(policy, tokenizer, probe_texts, reference, drift_every=1)
    resumed.load_state_dict(state)
    resumed.step(1)
    assert first.drift is not None and resumed.drift is not None
    assert torch.equal(resumed.drift.last, first.drift.last)


def test_a_state_without_drift_keys_still_loads(
    llama: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, probe_texts: list[str]
) -> None:
    first = make_session(llama, tokenizer, probe_texts)
    for step in range(3):
        first.step(step)
    old_state = {k: v for k, v in first.state_dict().items() if k not in ("probes_run", "drift")}
    resumed = make_session(llama, tokenizer, probe_texts, drift_every=3)
    resumed.load_state_dict(old_state)
    assert resumed.probes_run == 3 and resumed.drift is not None
    assert resumed.drift.reference is None
    resumed.step(3)
    assert len(drift_logged(resumed)) == 8  # probe number 3 drifts, against a snapshot


def test_drift_off_by_default_writes_no_drift_and_runs_no_extra_forward(
    llama: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    probe_texts: list[str],
    tmp_path: Path,
) -> None:
    session = make_session(llama, tokenizer, probe_texts)
    writer = SummaryWriter(str(tmp_path))
    forwards: list[int] = []
    llama.register_forward_pre_hook(lambda *args: forwards.append(1))
    session.begin(0, Outputs(TraceBoard(writer)), str(tmp_path))
    for step in range(1, 3):
        session.step(step)
    writer.close()
    assert len(forwards) == 1 + 3  # the first probe's lens check, then the probe's own forwards
    assert drift_logged(session) == {} and drift_steps(read_scalars(tmp_path)) == {}
    assert session.state_dict()["drift"] is None


def test_each_drift_probe_costs_one_extra_forward(
    llama: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, probe_texts: list[str]
) -> None:
    session = make_session(llama, tokenizer, probe_texts, drift_every=2)
    forwards: list[int] = []
    llama.register_forward_pre_hook(lambda *args: forwards.append(1))
    for step in range(4):
        session.step(step)
    assert len(forwards) == 1 + 4 + 2  # the lens check, four probes, two drift measurements


# The training callbacks


class LogRecorder(TrainerCallback):
    def __init__(self) -> None:
        self.keys: set[str] = set()

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any
    ) -> None:
        self.keys.update(logs or {})


def test_trl_dpo_trainer_writes_drift_of_every_block_at_the_drift_probes(
    make_model: Callable[..., PreTrainedModel],
    make_dpo_trainer: Callable[..., Any],
    tmp_path: Path,
) -> None:
    from spinal_callback.integrations.transformers import SpinalTrainerCallback, run_first

    policy = make_model("llama", layers=4)
    reference = copy.deepcopy(policy)
    callback = SpinalTrainerCallback(every_n_steps=2, drift_every=2, ref_model=reference)
    recorder = LogRecorder()
    trainer = make_dpo_trainer(
        callback, max_steps=6, model=policy, ref_model=reference, extra_callbacks=[recorder]
    )
    run_first(trainer, callback)
    trainer.train()
    assert [trace.step for trace in callback.traces] == [0, 2, 4, 6]
    events = read_scalars(tmp_path / "run" / "runs" / "spinal")
    assert drift_steps(events) == {tag: [0, 4] for tag in DRIFT_TAGS}
    for tag in DRIFT_TAGS:
        at_start, trained = (event.value for event in events.Scalars(tag))
        assert at_start == pytest.approx(0.0, abs=1e-6) and trained > 0
    assert set(DRIFT_TAGS) <= recorder.keys


def test_trl_resume_keeps_the_drift_schedule_and_reference(
    make_model: Callable[..., PreTrainedModel],
    make_dpo_trainer: Callable[..., Any],
    tmp_path: Path,
) -> None:
    from spinal_callback.integrations.transformers import SpinalTrainerCallback

    policy = make_model("llama", layers=4)
    first = SpinalTrainerCallback(every_n_steps=4, drift_every=2)
    reference = copy.deepcopy(policy)
    make_dpo_trainer(first, model=policy, ref_model=reference, output_dir=tmp_path).train()
    # TensorBoard orders event files by name (creation time in whole seconds): keep the resumed
    # writer's file later, as a real resume in a later process would.
    time.sleep(1.1)
    resumed = SpinalTrainerCallback(every_n_steps=4, drift_every=2)
    checkpoint = make_model("llama", layers=4)
    trainer = make_dpo_trainer(resumed, model=checkpoint, ref_model=reference, output_dir=tmp_path)
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-6"))
    assert drift_steps(read_scalars(tmp_path / "runs" / "spinal")) == {
        tag: [0, 8] for tag in DRIFT_TAGS
    }
    assert resumed.runner.drift.reference is not None
    assert first.runner.drift.reference is not None
    assert torch.equal(resumed.runner.drift.reference, first.runner.drift.reference)


def test_lightning_callback_writes_drift_of_every_block(
    make_model: Callable[..., PreTrainedModel],
    tokenizer: PreTrainedTokenizerFast,
    probe_texts: list[str],
    tmp_path: Path,
) -> None:
    pytest.importorskip("lightning.pytorch")
    from spinal_callback.integrations.lightning import SpinalCallback
    from tests.test_integration_lightning import TinyDPOModule, make_trainer, pair_batches

    callback = SpinalCallback(probe_texts=probe_texts, every_n_steps=4, drift_every=1)
    trainer = make_trainer(tmp_path, [callback], max_steps=8)
    trainer.fit(TinyDPOModule(make_model("llama", layers=4), tokenizer), pair_batches())
    events = read_scalars(Path(trainer.logger.log_dir))
    assert drift_steps(events) == {tag: [0, 4, 8] for tag in DRIFT_TAGS}
    for tag in DRIFT_TAGS:
        values = [event.value for event in events.Scalars(tag)]
        assert values[0] == pytest.approx(0.0, abs=1e-6) and values[-1] > 0


def test_a_snapshot_reference_lives_in_a_file_beside_the_event_log_not_in_the_state(
    make_model: Callable[..., PreTrainedModel],
    tokenizer: PreTrainedTokenizerFast,
    probe_texts: list[str],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    policy = make_model("llama", layers=4)
    first = make_session(policy, tokenizer, probe_texts, drift_every=1)
    first.begin(0, Outputs(), str(tmp_path))
    state = json.loads(json.dumps(first.state_dict()))
    stored = state["drift"]
    assert set(stored) == {"fingerprint", "file", "sha256"}
    assert Path(stored["file"]) == tmp_path / f"spinal_drift_reference.{first.run_id}.safetensors"
    perturb_mlp(policy, block=1)
    first.step(1)
    resumed = make_session(policy, tokenizer, probe_texts, drift_every=1)
    resumed.load_state_dict(state)
    resumed.step(1)
    assert resumed.drift.last is not None and first.drift.last is not None
    assert torch.equal(resumed.drift.last, first.drift.last)

    Path(stored["file"]).write_bytes(b"not the saved tensor")
    changed = make_session(policy, tokenizer, probe_texts, drift_every=1)
    with caplog.at_level(logging.WARNING, logger="spinal_callback"):
        changed.load_state_dict(state)
    assert "has changed since it was saved" in caplog.text
    assert changed.drift is not None and changed.drift.reference is None
