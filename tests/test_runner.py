"""The framework-free runner, driven by a fake trainer: schedule, stop decisions, failures of the
tool, faults of the sinks, bounded state and resume."""

from __future__ import annotations

import copy
import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from spinal_callback.config import SpinalConfig
from spinal_callback.monitor.alerts import Alert
from spinal_callback.outputs.event_log import EventLog
from spinal_callback.outputs.sinks import Outputs
from spinal_callback.probe.spinal_probe import SpinalProbe
from spinal_callback.training.good_checkpoint import GoodCheckpoint
from spinal_callback.training.guarded_probe import is_out_of_memory
from spinal_callback.training.runner import Decision, Runner


class FakeTrainer:
    """The smallest training loop an adapter stands for: a step changes the weights, logs every
    ``log_every`` steps, a checkpoint every ``save_every``; it obeys ``Decision.stop`` by saving
    and stopping before the next step."""

    def __init__(
        self,
        runner: Runner,
        model: torch.nn.Module,
        directory: Path,
        log_every: int = 2,
        save_every: int = 4,
        losses: Callable[[int], float] = lambda step: 0.69 - 0.01 * step,
    ) -> None:
        self.runner, self.model, self.directory = runner, model, directory
        self.log_every, self.save_every, self.losses = log_every, save_every, losses
        self.steps_taken = 0
        self.saved: list[int] = []
        self.good = GoodCheckpoint(str(directory / "good"), self.write_weights)

    def fit(self, max_steps: int, start: int = 0) -> list[Decision]:
        outputs = Outputs(event_log=EventLog(self.directory / "events.jsonl"))
        decisions = [self.runner.begin(start, outputs, self.directory)]
        step = start
        if decisions[-1].stop:
            self.save(step)
        while step < max_steps and not decisions[-1].stop:
            step += 1
            self.train_step()
            decisions.append(self.runner.step(step))
            if decisions[-1].save_good:
                promoted = self.good.rotate(step)
                if promoted is not None:
                    self.runner.saved(promoted, self.good.path)
            if step % self.log_every == 0 and not decisions[-1].stop:
                decisions.append(self.runner.logs(step, {"loss": self.losses(step)}))
            if decisions[-1].stop or step % self.save_every == 0:
                self.save(step)
        self.runner.end(step)
        return decisions

    def train_step(self) -> None:
        self.steps_taken += 1
        with torch.no_grad():
            for parameter in self.model.parameters():
                parameter.mul_(1.0 + 1e-4)

    def write_weights(self, path: str) -> None:
        Path(path).write_text(str(self.steps_taken))

    def save(self, step: int) -> None:
        self.saved.append(step)
        self.runner.saved(step, str(self.directory / f"checkpoint-{step}"))


def poison(model: torch.nn.Module) -> None:
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))


# ---- schedule and decisions ---------------------------------------------------------------


def test_probes_at_begin_and_every_n_steps_and_at_the_end(
    llama: PreTrainedModel, make_runner: Callable[..., Runner], tmp_path: Path
) -> None:
    runner = make_runner(llama, every_n_steps=3)
    FakeTrainer(runner, llama, tmp_path).fit(max_steps=7)
    assert [trace.step for trace in runner.traces] == [0, 3, 6, 7]


def test_a_critical_alert_stops_before_another_step_and_names_no_checkpoint_yet(
    llama: PreTrainedModel, make_runner: Callable[..., Runner], tmp_path: Path
) -> None:
    poison(llama)
    runner = make_runner(llama)
    trainer = FakeTrainer(runner, llama, tmp_path)
    decisions = trainer.fit(max_steps=10)
    assert decisions[0].stop and trainer.steps_taken == 0 and trainer.saved == [0]
    assert "No checkpoint was saved before the first warning (step 0)" in decisions[0].message


def test_the_stop_names_the_last_checkpoint_saved_before_the_first_warning(
    llama: PreTrainedModel, make_runner: Callable[..., Runner], tmp_path: Path
) -> None:
    runner = make_runner(llama)
    # The loss is fine, then non-finite from step 10: a critical non_finite at the log of step 10.
    trainer = FakeTrainer(runner, llama, tmp_path, losses=lambda s: math.nan if s >= 10 else 0.6)
    decisions = trainer.fit(max_steps=20)
    assert decisions[-1].stop and trainer.steps_taken == 10
    assert f"Resume from {tmp_path / 'checkpoint-8'} (step 8)" in decisions[-1].message
    records = EventLog(tmp_path / "events.jsonl").read()
    stop = next(record for record in records if record["metric"] == "spinal/stop")
    assert stop["rule"] == "training_stopped" and "checkpoint-8" in stop["message"]


def test_after_a_stop_the_saved_checkpoint_and_the_one_to_resume_from_are_reported(
    llama: PreTrainedModel,
    make_runner: Callable[..., Runner],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    runner = make_runner(llama)
    trainer = FakeTrainer(runner, llama, tmp_path, losses=lambda s: math.nan if s >= 10 else 0.6)
    with caplog.at_level(logging.INFO, logger="spinal_callback"):
        trainer.fit(max_steps=20)
    saved = EventLog(tmp_path / "events.jsonl").read()[-1]
    assert saved["rule"] == "training_stopped" and saved["metric"] == "spinal/stop_checkpoint"
    assert f"the stop's checkpoint is {tmp_path / 'checkpoint-10'} (step 10)" in saved["message"]
    assert f"Resume from {tmp_path / 'checkpoint-8'} (step 8)" in saved["message"]
    assert runner.stop_checkpoint == (10, str(tmp_path / "checkpoint-10"))
    summary = caplog.records[-1]
    assert summary.levelname == "ERROR"
    assert "1 alerts (1 critical, 0 warning, 0 info)" in summary.getMessage()
    assert "training stopped by critical non_finite" in summary.getMessage()
    assert f"the stop's checkpoint: {tmp_path / 'checkpoint-10'}" in summary.getMessage()


def test_the_stop_records_hold_its_facts_for_the_spinal_tab_and_the_console_points_to_it(
    llama: PreTrainedModel,
    make_runner: Callable[..., Runner],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    runner = make_runner(llama)
    trainer = FakeTrainer(runner, llama, tmp_path, losses=lambda s: math.nan if s >= 10 else 0.6)
    with caplog.at_level(logging.INFO, logger="spinal_callback"):
        trainer.fit(max_steps=20)
    stop, saved = EventLog(tmp_path / "events.jsonl").read()[-2:]
    assert stop["details"] == {
        "cause_rule": "non_finite",
        "cause_level": "critical",
        "cause_step": 10,
        "first_warning_step": 10,
        "resume_from": str(tmp_path / "checkpoint-8"),
        "resume_step": 8,
        "advice": f"Resume from {tmp_path / 'checkpoint-8'} (step 8), the last checkpoint "
        "saved before the first warning (step 10).",
    }
    assert saved["details"]["checkpoint"] == str(tmp_path / "checkpoint-10")
    assert saved["details"]["checkpoint_step"] == 10
    assert "by the critical non_finite alert of step 10." in stop["message"]
    assert "overflowed" not in stop["message"]  # the cause's own message is not repeated
    reference = json.loads((tmp_path / "spinal_reference.json").read_text())
    assert reference["run"] == runner.run_id and reference["trace"]["step"] == 0
    assert reference["event_log"] == str((tmp_path / "events.jsonl").resolve())


def test_a_quiet_run_ends_with_an_info_summary(
    llama: PreTrainedModel,
    make_runner: Callable[..., Runner],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    runner = make_runner(llama, every_n_steps=3)
    with caplog.at_level(logging.INFO, logger="spinal_callback"):
        FakeTrainer(runner, llama, tmp_path).fit(max_steps=6)
    assert caplog.records[-1].levelname == "INFO"
    assert "3 probes up to step 6, 0 alerts" in caplog.records[-1].getMessage()


def test_stop_on_none_never_calls_the_collective(
    llama: PreTrainedModel, make_runner: Callable[..., Runner], tmp_path: Path
) -> None:
    poison(llama)
    runner = make_runner(llama, stop_on=None)
    calls: list[bool] = []
    runner.reduce_any = lambda flag: calls.append(flag) or flag
    decisions = FakeTrainer(runner, llama, tmp_path).fit(max_steps=6)
    assert calls == [] and not any(d.stop for d in decisions)
    assert any(alert.level == "critical" for alert in runner.alerts)


def test_another_ranks_stop_request_stops_this_rank_too(
    llama: PreTrainedModel, make_runner: Callable[..., Runner], tmp_path: Path
) -> None:
    runner = make_runner(llama)
    runner.reduce_any = lambda flag: True  # as if rank 1 had raised a critical alert
    decisions = FakeTrainer(runner, llama, tmp_path).fit(max_steps=6)
    assert decisions[0].stop and "another rank's alert" in decisions[0].message


# ---- failures of the tool -----------------------------------------------------------------


def fail_probe(monkeypatch: pytest.MonkeyPatch, error: BaseException, times: int = 1) -> list[int]:
    """Make the next ``times`` probe runs (of any probe) raise ``error``; returns the calls."""
    calls: list[int] = []
    original = SpinalProbe.run

    def run(probe: SpinalProbe, step: int = 0) -> Any:
        calls.append(step)
        if len(calls) <= times:
            raise error
        return original(probe, step)

    monkeypatch.setattr(SpinalProbe, "run", run)
    return calls


@pytest.mark.fault
def test_an_out_of_memory_probe_is_retried_with_half_the_batch_and_the_baseline_restarts(
    llama: PreTrainedModel,
    make_runner: Callable[..., Runner],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    runner = make_runner(llama)
    FakeTrainer(runner, llama, tmp_path).fit(max_steps=2)
    rows = runner.traces[-1].metadata["probe_rows"]
    fail_probe(monkeypatch, torch.OutOfMemoryError("CUDA out of memory"))
    with caplog.at_level(logging.WARNING, logger="spinal_callback"):
        runner.step(4)
    assert runner.traces[-1].metadata["probe_rows"] == rows // 2
    # Traces of the full batch are not comparable with the halved probe's: a new baseline.
    assert [trace.step for trace in runner.traces] == [4]
    assert runner.reference is not None
    assert runner.reference.probe_fingerprint == runner.traces[-1].probe_fingerprint
    assert "the probe changed at step 4" in caplog.text


@pytest.mark.fault
def test_after_an_out_of_memory_retry_the_policy_and_its_reference_measure_the_same_tokens(
    llama: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    probe_texts: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reference = copy.deepcopy(llama)
    with torch.no_grad():  # a reference whose lens would settle on another token count alone
        for parameter in reference.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.5)
    runner = Runner(SpinalConfig(every_n_steps=2, transport_tolerance=0.05), probe_texts)
    runner.setup(llama, tokenizer, reference_model=reference)
    FakeTrainer(runner, llama, tmp_path).fit(max_steps=2)
    fail_probe(monkeypatch, torch.OutOfMemoryError("CUDA out of memory"))
    runner.step(4)
    assert runner.probe is not None and runner.reference_probe is not None
    assert runner.reference_probe.lens_tokens is runner.probe.lens_tokens
    assert runner.reference is not None and runner.reference.step == 4
    policy, baseline = runner.traces[-1], runner.reference
    assert baseline.metadata["transport_tokens"] == policy.metadata["transport_tokens"]
    assert baseline.neutral is not None and policy.neutral is not None
    assert (
        baseline.neutral.metadata["transport_tokens"] == policy.neutral.metadata["transport_tokens"]
    )


def test_a_probe_bug_is_not_retried_and_switches_probing_off(
    llama: PreTrainedModel,
    make_runner: Callable[..., Runner],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    runner = make_runner(llama)
    calls = fail_probe(monkeypatch, TypeError("a bug"))
    decisions = FakeTrainer(runner, llama, tmp_path).fit(max_steps=6)
    assert calls == [0] and runner.disabled and runner.traces == []
    assert [alert.rule for alert in runner.alerts] == ["probe_failed"]
    assert not any(decision.stop for decision in decisions)


@pytest.mark.fault
def test_a_failing_probe_never_stops_training_even_with_stop_on_warning(
    llama: PreTrainedModel,
    make_runner: Callable[..., Runner],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    runner = make_runner(llama, stop_on="warning")
    fail_probe(monkeypatch, torch.OutOfMemoryError("out of memory"), times=5)
    trainer = FakeTrainer(runner, llama, tmp_path)
    decisions = trainer.fit(max_steps=6)
    assert trainer.steps_taken == 6 and not any(decision.stop for decision in decisions)
    assert [alert.level for alert in runner.alerts] == ["warning", "warning"]


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (torch.OutOfMemoryError("CUDA out of memory"), True),
        (MemoryError(), True),
        (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate"), True),
        (RuntimeError("expected scalar type Float but found Half"), False),
        (TypeError("unexpected keyword"), False),
    ],
)
def test_only_allocator_failures_count_as_out_of_memory(
    error: BaseException, expected: bool
) -> None:
    assert is_out_of_memory(error) is expected


# ---- faults of the sinks ------------------------------------------------------------------


@pytest.mark.fault
def test_a_raising_on_alert_hook_is_logged_once_and_training_goes_on(
    llama: PreTrainedModel,
    make_runner: Callable[..., Runner],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def webhook_down(alert: Alert) -> None:
        raise ConnectionError("webhook is down")

    poison(llama)
    runner = make_runner(llama, webhook_down, stop_on=None)
    with caplog.at_level(logging.ERROR, logger="spinal_callback"):
        FakeTrainer(runner, llama, tmp_path, losses=lambda step: 5.0).fit(max_steps=6)
    assert len(runner.alerts) >= 2
    assert caplog.text.count("the on_alert hook failed") == 1


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_full_event_log_is_logged_once_and_the_stop_still_works(
    llama: PreTrainedModel,
    make_runner: Callable[..., Runner],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    poison(llama)
    runner = make_runner(llama)
    outputs = Outputs(event_log=EventLog("/dev/full"))
    with caplog.at_level(logging.ERROR, logger="spinal_callback"):
        decision = runner.begin(0, outputs, tmp_path)
    assert decision.stop and runner.alerts
    assert caplog.text.count("writing the event log /dev/full failed") == 1


# ---- state --------------------------------------------------------------------------------


def test_the_checkpointed_state_does_not_grow_with_the_number_of_probes(
    llama: PreTrainedModel, make_runner: Callable[..., Runner], tmp_path: Path
) -> None:
    runner = make_runner(llama, every_n_steps=1)
    trainer = FakeTrainer(runner, llama, tmp_path, save_every=1000)
    trainer.fit(max_steps=4)
    small = len(json.dumps(runner.state_dict()))
    trainer.fit(max_steps=40, start=4)
    assert len(runner.traces) == 41
    assert len(json.dumps(runner.state_dict())) <= small + 200


@pytest.mark.fault
def test_resume_restores_the_history_and_supersedes_what_the_killed_run_wrote_after_it(
    make_model: Callable[..., PreTrainedModel],
    make_runner: Callable[..., Runner],
    tmp_path: Path,
) -> None:
    model = make_model("llama", layers=4)
    first = make_runner(model)
    trainer = FakeTrainer(first, model, tmp_path, losses=lambda s: 5.0 if s > 4 else 0.6)
    trainer.fit(max_steps=4)
    state = json.loads(json.dumps(first.state_dict()))  # the checkpoint at step 4
    trainer.fit(max_steps=8, start=4)  # then the run goes on, alerts, and is killed
    log = EventLog(tmp_path / "events.jsonl")
    killed = [record for record in log.read() if record["step"] > 4]
    assert killed

    resumed = make_runner(model)
    resumed.load_state_dict(state)
    FakeTrainer(resumed, model, tmp_path, losses=lambda s: 0.6).fit(max_steps=8, start=4)
    assert [trace.step for trace in resumed.traces] == [0, 2, 4, 6, 8]
    lines = [json.loads(line) for line in (tmp_path / "spinal_traces.jsonl").open()]
    segments = {(line["segment"], line["trace"]["step"]) for line in lines}
    assert {(0, 6), (0, 8)} <= segments, "the killed segment's traces stay in the file"
    assert [line["trace"]["step"] for line in lines if line["segment"] == 1] == [0, 2, 4, 6, 8]
    records = log.read()
    assert all(record in records for record in killed), "the event log never loses a record"
    assert [r for r in log.read_current() if r["step"] > 4 and r["rule"] != "resumed"] == []


def test_a_resume_with_other_probe_texts_restarts_the_baseline(
    llama: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    make_runner: Callable[..., Runner],
    probe_texts: list[str],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    first = make_runner(llama)
    FakeTrainer(first, llama, tmp_path).fit(max_steps=4)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = Runner(SpinalConfig(every_n_steps=2), probe_texts[:-2])
    resumed.setup(llama, tokenizer)
    resumed.load_state_dict(state)
    with caplog.at_level(logging.WARNING, logger="spinal_callback"):
        FakeTrainer(resumed, llama, tmp_path).fit(max_steps=6, start=4)
    assert [trace.step for trace in resumed.traces] == [6]
    assert "the probe changed at step 6" in caplog.text


def test_a_restored_runner_goes_on_exactly_as_the_original_would(
    llama: PreTrainedModel, make_runner: Callable[..., Runner], tmp_path: Path
) -> None:
    """State left out of both ``state_dict`` and ``load_state_dict`` (a rule's window, the
    reference, the schedule) would make the two runners part ways after the restore."""
    noisy = [0.69, 0.68, 0.70, 0.67, 0.69, 0.66, 0.68, 0.65, 0.67, 0.64, 0.66, 0.63]
    spiking = [*noisy, 3.0, 3.2, 3.1]

    def losses(step: int) -> float:
        return spiking[min(step // 2, len(spiking) - 1)]

    original = make_runner(llama, stop_on=None)
    trainer = FakeTrainer(original, llama, tmp_path / "a", losses=losses)
    trainer.fit(max_steps=20)
    state = json.loads(json.dumps(original.state_dict()))
    twin = copy.deepcopy(llama)
    restored = make_runner(twin, stop_on=None)
    restored.load_state_dict(state)
    for runner, model, directory in ((original, llama, "a"), (restored, twin, "b")):
        FakeTrainer(runner, model, tmp_path / directory, losses=losses).fit(max_steps=30, start=20)
    after = [(a.step, a.rule, a.level) for a in original.alerts if a.step > 20]
    assert after, "the continuation must raise something for the comparison to mean anything"
    assert [(a.step, a.rule, a.level) for a in restored.alerts] == after
    assert json.dumps(restored.monitor.state_dict(), sort_keys=True) == json.dumps(
        original.monitor.state_dict(), sort_keys=True
    )


def test_a_good_checkpoint_is_kept_at_every_quiet_probe_and_named_at_the_stop(
    llama: PreTrainedModel, make_runner: Callable[..., Runner], tmp_path: Path
) -> None:
    runner = make_runner(llama)
    runner.keep_good_checkpoint = True
    # A loss far above ln 2 from the log of step 10: critical preference_reversal at step 12.
    trainer = FakeTrainer(
        runner, llama, tmp_path, save_every=1000, losses=lambda s: 3.0 if s >= 10 else 0.6
    )
    decisions = trainer.fit(max_steps=20)
    assert decisions[-1].stop and trainer.steps_taken == 12
    # The probe at step 12 was quiet, but the logs of that step raised the alert: the good
    # checkpoint is the one the probe at 12 vouched for, saved at step 10.
    assert (tmp_path / "good").read_text() == "10"
    assert f"Resume from {tmp_path / 'good'} (step 10)" in decisions[-1].message
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("good")) == [
        "good",
        "good.candidate",
    ]


@pytest.mark.parametrize(
    ("texts", "error", "message"),
    [
        ("one string", TypeError, "list of strings"),
        ([], ValueError, "probe_texts"),
        (["a fine text", None], TypeError, "not strings"),
        (["a fine text", "   "], ValueError, "empty or only whitespace"),
    ],
)
def test_bad_probe_texts_fail_when_either_callback_is_built(
    texts: Any, error: type[Exception], message: str
) -> None:
    from spinal_callback.integrations.lightning import SpinalCallback
    from spinal_callback.integrations.transformers import SpinalTrainerCallback

    for callback in (SpinalCallback, SpinalTrainerCallback):
        with pytest.raises(error, match=message):
            callback(probe_texts=texts)


def test_the_reference_and_the_policy_trace_the_same_lens_tokens(
    make_model: Callable[..., PreTrainedModel],
    tokenizer: PreTrainedTokenizerFast,
    probe_texts: list[str],
) -> None:
    """The reference's probe runs first and settles the lens's sample size; the policy's probe
    takes the same tokens without sizing its own, so the reference is its baseline token for
    token."""
    runner = Runner(SpinalConfig(transport_tolerance=1.0), probe_texts)
    runner.setup(make_model("llama", seed=1), tokenizer, reference_model=make_model("llama"))
    assert runner.reference_probe is not None and runner.probe is not None
    reference = runner.reference_probe.run(0)
    assert reference.neutral is not None
    assert runner.probe.lens_tokens == {
        0: reference.metadata["transport_tokens"],
        1: reference.neutral.metadata["transport_tokens"],
    }
    policy = runner.probe.run(0)
    assert policy.metadata["transport_tokens"] == reference.metadata["transport_tokens"]


def test_a_resumed_probe_takes_as_many_lens_tokens_as_its_restored_reference(
    llama: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    probe_texts: list[str],
    tmp_path: Path,
) -> None:
    first = Runner(SpinalConfig(every_n_steps=2, transport_tolerance=1e-9), probe_texts)
    first.setup(llama, tokenizer)
    FakeTrainer(first, llama, tmp_path).fit(max_steps=2)
    settled = dict(first.probe.lens_tokens) if first.probe is not None else {}
    assert settled[0] > 256  # every sample token: more than a loose tolerance would take
    state = json.loads(json.dumps(first.state_dict()))
    resumed = Runner(SpinalConfig(every_n_steps=2, transport_tolerance=1.0), probe_texts)
    resumed.setup(llama, tokenizer)
    resumed.load_state_dict(state)
    assert resumed.probe is not None and resumed.probe.lens_tokens == settled


def test_a_resume_from_a_reference_probed_without_the_models_logit_scale_restarts_the_baseline(
    make_model: Callable[..., PreTrainedModel],
    make_runner: Callable[..., Runner],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cohere = make_model("cohere", layers=4)
    first = make_runner(cohere)
    FakeTrainer(first, cohere, tmp_path).fit(max_steps=4)
    state = json.loads(json.dumps(first.state_dict()))
    assert state["baseline"]["reference"]["metadata"]["logit_scale"] == pytest.approx(0.0625)
    unchanged = make_runner(cohere)
    unchanged.load_state_dict(state)
    # As saved before the lens was checked:
    del state["baseline"]["reference"]["metadata"]["logit_scale"]
    resumed = make_runner(cohere)
    resumed.load_state_dict(state)
    with caplog.at_level(logging.WARNING, logger="spinal_callback"):
        FakeTrainer(unchanged, cohere, tmp_path / "unchanged").fit(max_steps=6, start=4)
        assert "the probe changed" not in caplog.text
        FakeTrainer(resumed, cohere, tmp_path / "resumed").fit(max_steps=6, start=4)
    assert "the probe changed at step 6 (the lens's logit scale none -> 0.0625)" in caplog.text
    assert resumed.reference is not None
    assert resumed.reference.metadata["logit_scale"] == pytest.approx(0.0625)
