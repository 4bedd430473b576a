"""SpinalTrainerCallback in TRL's DPOTrainer: schedule, TensorBoard, reference, resume, errors."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import PreTrainedModel, TrainerCallback

from spinal_callback.demos.preference_data import WORDS
from spinal_callback.integrations.transformers import SpinalTrainerCallback, run_first
from spinal_callback.outputs.tensorboard import layer_scalars, trace_scalars
from spinal_callback.probe.metrics import RAMP_SUMMARY_NAMES
from spinal_callback.probe.spinal_probe import SpinalProbe

datasets = pytest.importorskip("datasets")
trl = pytest.importorskip("trl")


def read_scalars(log_dir: Path) -> EventAccumulator:
    accumulator = EventAccumulator(
        str(log_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0}
    )
    accumulator.Reload()
    return accumulator


def test_probes_at_train_begin_every_n_steps_and_train_end(
    make_dpo_trainer: Callable[..., Any],
) -> None:
    callback = SpinalTrainerCallback(every_n_steps=5)
    make_dpo_trainer(callback, max_steps=12).train()
    assert [trace.step for trace in callback.traces] == [0, 5, 10, 12]


def test_tensorboard_holds_exactly_the_traces_the_callback_produced(
    make_dpo_trainer: Callable[..., Any], tmp_path: Path
) -> None:
    callback = SpinalTrainerCallback(every_n_steps=4, image_every=2)
    make_dpo_trainer(callback).train()
    log_dir = tmp_path / "run" / "runs" / "spinal"
    events = read_scalars(log_dir)
    for trace in callback.traces:
        for tag, value in trace_scalars(trace).items():
            logged = {event.step: event.value for event in events.Scalars(tag)}
            assert logged[trace.step] == pytest.approx(value, rel=1e-6), tag
        for run, scalars in layer_scalars(trace).items():
            block = read_scalars(log_dir / run)
            for tag, value in scalars.items():
                logged = {event.step: event.value for event in block.Scalars(tag)}
                assert logged[trace.step] == pytest.approx(value, rel=1e-6), (run, tag)
    steps = [event.step for event in events.Scalars("spinal/ramp/tortuosity")]
    assert steps == [trace.step for trace in callback.traces]
    assert "spinal/depth_trace" in events.Tags()["images"]
    assert {e.value for e in events.Scalars("spinal/alert_level")} == {0.0}


def test_tensorboard_shows_the_reference_beside_the_run(
    make_dpo_trainer: Callable[..., Any], tmp_path: Path
) -> None:
    callback = SpinalTrainerCallback(every_n_steps=4)
    make_dpo_trainer(callback).train()
    events = read_scalars(tmp_path / "run" / "runs" / "spinal" / "reference")
    reference = callback.runner.reference
    assert reference is not None
    for name in RAMP_SUMMARY_NAMES:
        values = [event.value for event in events.Scalars(f"spinal/ramp/{name}")]
        assert values == [pytest.approx(reference.summary[name], rel=1e-6)] * len(callback.traces)


def test_custom_scalar_layout_groups_each_score_of_the_band(
    make_dpo_trainer: Callable[..., Any], tmp_path: Path
) -> None:
    from tensorboard.plugins.custom_scalar import layout_pb2

    make_dpo_trainer(SpinalTrainerCallback(every_n_steps=4)).train()
    events = read_scalars(tmp_path / "run" / "runs" / "spinal")
    stored = events.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0]
    layout = layout_pb2.Layout.FromString(stored)
    charts = {chart.title: list(chart.multiline.tag) for c in layout.category for chart in c.chart}
    assert charts["contraction of blocks 0-3"] == [r"^spinal/contraction$"]
    assert charts["tortuosity"] == [r"^spinal/ramp/tortuosity$"]


def test_reference_is_the_trls_ref_model(
    make_dpo_trainer: Callable[..., Any], make_model: Callable[..., PreTrainedModel]
) -> None:
    policy = make_model("llama", layers=4)
    reference = make_model("llama", layers=4, seed=1)
    callback = SpinalTrainerCallback(every_n_steps=4, ref_model=reference)
    make_dpo_trainer(callback, model=policy, ref_model=reference).train()
    expected = SpinalProbe(reference, callback.runner.probe.batch).run()
    assert callback.runner.reference is not None
    torch.testing.assert_close(callback.runner.reference.contraction, expected.contraction)
    assert not torch.allclose(callback.runner.reference.contraction, callback.traces[0].contraction)


def test_lora_policy_is_traced_adapted_and_reference_with_adapters_disabled(
    make_dpo_trainer: Callable[..., Any],
) -> None:
    from peft import LoraConfig

    callback = SpinalTrainerCallback(every_n_steps=6)
    lora = LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj", "down_proj"])
    trainer = make_dpo_trainer(callback, peft_config=lora)
    trainer.train()
    reference, final = callback.runner.reference, callback.traces[-1]
    assert reference is not None
    torch.testing.assert_close(reference.contraction, callback.traces[0].contraction)
    assert not torch.allclose(final.contraction, reference.contraction, atol=1e-5)


class LogRecorder(TrainerCallback):
    def __init__(self) -> None:
        self.keys: set[str] = set()

    def on_log(
        self,
        args: Any,
        state: Any,
        control: Any,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        self.keys.update(logs or {})


def test_summaries_reach_reporting_callbacks_listed_before_it(
    make_dpo_trainer: Callable[..., Any],
) -> None:
    recorder = LogRecorder()
    spinal = SpinalTrainerCallback(every_n_steps=4)
    trainer = make_dpo_trainer(spinal, extra_callbacks=[recorder])
    run_first(trainer, spinal)
    trainer.train()
    assert {f"spinal/ramp/{name}" for name in RAMP_SUMMARY_NAMES} <= recorder.keys
    assert {"spinal/neutral/perplexity_ratio", "spinal/neutral/departure"} <= recorder.keys


def test_run_first_puts_it_ahead_of_the_reporters_but_behind_hfs_tensorboard(
    make_dpo_trainer: Callable[..., Any],
) -> None:
    from transformers.integrations import TensorBoardCallback

    recorder, tensorboard = LogRecorder(), TensorBoardCallback()
    spinal = SpinalTrainerCallback(every_n_steps=4)
    trainer = make_dpo_trainer(spinal, extra_callbacks=[recorder, tensorboard])
    run_first(trainer, spinal)
    run_first(trainer, spinal)
    callbacks = trainer.callback_handler.callbacks
    assert callbacks[:2] == [tensorboard, spinal]
    assert callbacks.index(recorder) > 1 and len(callbacks) == len(set(map(id, callbacks)))


def test_the_monitor_is_calibrated_on_the_reference_trace(
    make_dpo_trainer: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    spinal = SpinalTrainerCallback(every_n_steps=4)
    with caplog.at_level("WARNING", logger="spinal_callback"):
        make_dpo_trainer(spinal).train()
    # The fixture's model is random-initialised: no language for the neutral rules to watch.
    muted = [r for r in caplog.records if "trace_departure are off" in r.getMessage()]
    assert len(muted) == 1
    session = spinal.runner
    assert session.reference is not None and session.monitor.reference is session.reference
    assert session.reference.neutral is not None
    assert session.monitor.probes_seen == len(spinal.traces)


@pytest.mark.fault
def test_resume_writes_no_duplicate_and_no_missing_probe_steps(
    make_dpo_trainer: Callable[..., Any], tmp_path: Path, make_model: Callable[..., PreTrainedModel]
) -> None:
    output = tmp_path / "resumable"
    first = SpinalTrainerCallback(every_n_steps=4)
    make_dpo_trainer(first, output_dir=output).train()
    # TensorBoard reads event files in name order, and names carry the creation time in whole
    # seconds: a real resume is a later process, so keep the resumed writer's file later too.
    time.sleep(1.1)
    resumed = SpinalTrainerCallback(every_n_steps=4)
    checkpoint = make_model("llama", layers=4)
    trainer = make_dpo_trainer(resumed, output_dir=output, model=checkpoint)
    trainer.train(resume_from_checkpoint=str(output / "checkpoint-6"))
    assert [trace.step for trace in resumed.traces] == [0, 4, 8, 12]
    events = read_scalars(output / "runs" / "spinal")
    logged = events.Scalars("spinal/ramp/transport_mean")
    assert [event.step for event in logged] == [0, 4, 8, 12]
    assert logged[-1].value == pytest.approx(resumed.traces[-1].summary["transport_mean"], rel=1e-6)


def test_missing_tokenizer_and_probe_texts_fails_before_the_first_step(
    make_dpo_trainer: Callable[..., Any],
) -> None:
    trainer = make_dpo_trainer(SpinalTrainerCallback())
    trainer.callback_handler.processing_class = None
    with pytest.raises(ValueError, match="needs a tokenizer"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_probe_longer_than_the_context_fails_before_the_first_step(
    make_dpo_trainer: Callable[..., Any],
) -> None:
    long_text = " ".join(WORDS * 80)
    trainer = make_dpo_trainer(
        SpinalTrainerCallback(probe_texts=[long_text], max_probe_length=1024)
    )
    with pytest.raises(ValueError, match="model's context is 512"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_every_n_steps_below_one_is_rejected_at_construction() -> None:
    with pytest.raises(ValueError, match="every_n_steps must be an int >= 1, got 0"):
        SpinalTrainerCallback(every_n_steps=0)


def test_unknown_config_field_is_rejected_at_construction() -> None:
    with pytest.raises(TypeError, match="unknown SpinalConfig field"):
        SpinalTrainerCallback(every_n_step=5)


@pytest.mark.fault
def test_a_failing_probe_is_retried_with_half_the_batch_and_training_goes_on(
    make_dpo_trainer: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    original = SpinalProbe.run
    full_rows: list[int] = []

    def run_out_of_memory_on_full_batch(self: SpinalProbe, step: int = 0) -> Any:
        if not full_rows:
            full_rows.append(self.batch.input_ids.shape[0])
        if self.batch.input_ids.shape[0] == full_rows[0] and step >= 4:
            raise torch.OutOfMemoryError("simulated out of memory")
        return original(self, step)

    monkeypatch.setattr(SpinalProbe, "run", run_out_of_memory_on_full_batch)
    alerts: list[Any] = []
    callback = SpinalTrainerCallback(every_n_steps=4, on_alert=alerts.append)
    trainer = make_dpo_trainer(callback)
    trainer.train()
    assert trainer.state.global_step == 12
    # The halved probe is another probe: the baseline restarts at step 4 on it.
    assert [trace.step for trace in callback.traces] == [4, 8, 12]
    assert callback.runner.reference is not None
    assert callback.runner.reference.metadata["probe_rows"] == full_rows[0] // 2
    assert [alert.rule for alert in alerts] == ["probe_failed"]
    assert callback.traces[-1].metadata["probe_rows"] == full_rows[0] // 2


@pytest.mark.fault
def test_a_probe_that_keeps_failing_is_switched_off_and_training_goes_on(
    make_dpo_trainer: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    original = SpinalProbe.run

    def fail_after_start(self: SpinalProbe, step: int = 0) -> Any:
        if step >= 4:
            raise RuntimeError("CUDA out of memory (simulated)")
        return original(self, step)

    monkeypatch.setattr(SpinalProbe, "run", fail_after_start)
    alerts: list[Any] = []
    callback = SpinalTrainerCallback(every_n_steps=4, on_alert=alerts.append)
    trainer = make_dpo_trainer(callback)
    trainer.train()
    assert trainer.state.global_step == 12
    assert [trace.step for trace in callback.traces] == [0]
    assert callback.runner.disabled
    assert len(alerts) == 2 and "probing is off" in alerts[-1].message
    assert "retrying with half the batch" in alerts[0].message


class PoisonWeightsAt(TrainerCallback):
    """Fault injection: overwrite one late MLP weight with inf after optimizer step `step`."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(
        self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any
    ) -> None:
        if state.global_step == self.step:
            with torch.no_grad():
                model.model.layers[-1].mlp.down_proj.weight.fill_(float("inf"))


def test_critical_alert_saves_a_checkpoint_and_stops_training(
    make_dpo_trainer: Callable[..., Any], tmp_path: Path
) -> None:
    alerts: list[Any] = []
    callback = SpinalTrainerCallback(every_n_steps=2, on_alert=alerts.append)
    trainer = make_dpo_trainer(callback, max_steps=12, extra_callbacks=[PoisonWeightsAt(3)])
    trainer.train()
    assert trainer.state.global_step == 4
    assert (tmp_path / "run" / "checkpoint-4").is_dir()
    # The probe at step 4 sees it first, then the step's logs (TRL's NaN rewards) confirm it.
    assert [(a.step, a.level, a.rule, a.metric) for a in alerts] == [
        (4, "critical", "non_finite", "spinal/ramp/contraction_slope"),
        (4, "critical", "non_finite", "rewards/chosen"),
    ]
    log_dir = tmp_path / "run" / "runs" / "spinal"
    records = [json.loads(line) for line in (log_dir / "spinal_events.jsonl").open()]
    assert [r["metric"] for r in records if r["rule"] != "training_stopped"] == [
        a.metric for a in alerts
    ]
    stop, saved = [r for r in records if r["rule"] == "training_stopped"]
    assert stop["step"] == 4 and "training stopped at step 4" in stop["message"]
    assert f"the stop's checkpoint is {tmp_path / 'run' / 'checkpoint-4'}" in saved["message"]
    levels = {e.step: e.value for e in read_scalars(log_dir).Scalars("spinal/alert_level")}
    assert levels[4] == 3.0 and levels[2] == 0.0


def test_non_finite_training_logs_stop_the_run_between_probes(
    make_dpo_trainer: Callable[..., Any], tmp_path: Path
) -> None:
    alerts: list[Any] = []
    callback = SpinalTrainerCallback(every_n_steps=100, on_alert=alerts.append)
    trainer = make_dpo_trainer(callback, max_steps=12, extra_callbacks=[PoisonWeightsAt(3)])
    trainer.train()
    assert trainer.state.global_step == 4  # the first logging step after the overflow
    assert (tmp_path / "run" / "checkpoint-4").is_dir()
    assert [(a.step, a.level, a.rule) for a in alerts][:1] == [(4, "critical", "non_finite")]
    assert alerts[0].metric.startswith("rewards/")


def test_stop_on_none_only_warns(make_dpo_trainer: Callable[..., Any]) -> None:
    alerts: list[Any] = []
    callback = SpinalTrainerCallback(every_n_steps=2, stop_on=None, on_alert=alerts.append)
    trainer = make_dpo_trainer(callback, max_steps=8, extra_callbacks=[PoisonWeightsAt(4)])
    trainer.train()
    assert trainer.state.global_step == 8
    assert alerts and all(a.rule == "non_finite" for a in alerts)


def test_resume_restores_the_state_onto_the_users_live_callback(
    make_dpo_trainer: Callable[..., Any], tmp_path: Path, make_model: Callable[..., PreTrainedModel]
) -> None:
    output = tmp_path / "restored"
    first = SpinalTrainerCallback(every_n_steps=4, stop_on=None)
    make_dpo_trainer(first, output_dir=output).train()
    alerts: list[Any] = []
    live = SpinalTrainerCallback(every_n_steps=4, stop_on=None, on_alert=alerts.append)
    trainer = make_dpo_trainer(
        live,
        output_dir=output,
        model=make_model("llama", layers=4),
        restore_callback_states_from_checkpoint=True,
        extra_callbacks=[PoisonWeightsAt(7)],
    )
    trainer.train(resume_from_checkpoint=str(output / "checkpoint-6"))
    assert live in trainer.callback_handler.callbacks
    # The baseline and the traces before the checkpoint are the first run's, on this object:
    # probed again at the resume (from step-6 weights) they would differ.
    assert first.runner.reference is not None and live.runner.reference is not None
    torch.testing.assert_close(
        live.runner.reference.contraction, first.runner.reference.contraction
    )
    assert [trace.step for trace in live.traces] == [0, 4, 8, 12]
    for restored, saved in zip(live.traces[:2], first.traces[:2]):
        torch.testing.assert_close(restored.contraction, saved.contraction)
    # The weights poisoned after the resume raise alerts that reach the user's own hook.
    assert alerts and {alert.rule for alert in alerts} == {"non_finite"}
    assert min(alert.step for alert in alerts) == 8


def test_the_checkpointed_state_stays_small_however_many_probes(
    make_dpo_trainer: Callable[..., Any], tmp_path: Path
) -> None:
    spinal = SpinalTrainerCallback(every_n_steps=1)
    make_dpo_trainer(spinal, max_steps=12).train()
    saved = json.loads((tmp_path / "run" / "checkpoint-12" / "trainer_state.json").read_text())
    state = saved["stateful_callbacks"]["spinal_callback"]
    assert state["history"]["count"] == 13 and len(json.dumps(state)) < 20_000


@pytest.mark.fault
def test_nan_weights_at_the_first_probe_stop_with_a_checkpoint_and_no_weight_change(
    make_dpo_trainer: Callable[..., Any], tmp_path: Path, make_model: Callable[..., PreTrainedModel]
) -> None:
    policy = make_model("llama", layers=4)
    with torch.no_grad():
        policy.model.layers[-1].mlp.down_proj.weight.fill_(float("nan"))
    before = {name: p.detach().clone() for name, p in policy.named_parameters()}
    trainer = make_dpo_trainer(SpinalTrainerCallback(every_n_steps=4), model=policy)
    trainer.train()
    assert trainer.state.global_step == 1
    assert (tmp_path / "run" / "checkpoint-1").is_dir()
    for name, parameter in policy.named_parameters():
        torch.testing.assert_close(parameter, before[name], equal_nan=True, rtol=0, atol=0)


def test_keep_good_checkpoint_holds_weights_from_before_the_trouble(
    make_dpo_trainer: Callable[..., Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = tmp_path / "good"
    callback = SpinalTrainerCallback(every_n_steps=2, keep_good_checkpoint=str(good))
    trainer = make_dpo_trainer(callback, max_steps=12, extra_callbacks=[PoisonWeightsAt(5)])
    with caplog.at_level("ERROR", logger="spinal_callback"):
        trainer.train()
    assert trainer.state.global_step == 6
    # Candidates at the quiet probes 2 and 4; the probe at 4 vouched for the one of step 2.
    assert (good / "model.safetensors").is_file() and (tmp_path / "good.candidate").is_dir()
    assert f"Resume from {good} (step 2)" in caplog.text
