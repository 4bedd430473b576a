"""The callback touches only what is this run's, and never loses a record.

Each test reproduces one finding of a hostile trial on a tiny model: a good-checkpoint path that
named the user's folder, a checkpoint naming another file, two runs writing one log dir, a resume
that erased the stop's record, a versioned Lightning logger, the alert level after a resume, a
callback reused for another run, and bad arguments accepted until the first alert.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import PreTrainedModel

from spinal_callback.integrations.transformers import SpinalTrainerCallback
from spinal_callback.outputs.event_log import RESUMED, EventLog
from spinal_callback.outputs.ownership import RunConflictError
from spinal_callback.outputs.sinks import Outputs
from spinal_callback.outputs.tensorboard import TraceBoard
from spinal_callback.training.good_checkpoint import GoodCheckpoint, rotate_good_checkpoint
from spinal_callback.training.runner import Runner
from tests.test_integration_transformers import PoisonWeightsAt
from tests.test_runner import FakeTrainer

ROOT = Path(__file__).resolve().parents[1]


def trace_steps(path: Path) -> list[int]:
    return [json.loads(line)["trace"]["step"] for line in path.open()]


def rules_in(path: Path) -> list[tuple[int, str]]:
    return [(r["step"], r["rule"]) for r in EventLog(path).read()]


# ---- the good checkpoint replaces only its own paths ----------------------------------------


@pytest.mark.bad_input
def test_a_good_checkpoint_path_holding_the_users_files_is_refused_at_construction(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("precious")
    with pytest.raises(ValueError, match="not created by spinal-callback"):
        SpinalTrainerCallback(keep_good_checkpoint=str(folder))
    assert (folder / "notes.txt").read_text() == "precious"


@pytest.mark.bad_input
def test_a_good_checkpoint_naming_the_output_dir_is_refused_before_the_first_step(
    make_dpo_trainer: Callable[..., Any], tmp_path: Path
) -> None:
    output = tmp_path / "run"
    callback = SpinalTrainerCallback(every_n_steps=2, keep_good_checkpoint=str(output))
    trainer = make_dpo_trainer(callback, output_dir=output)
    with pytest.raises(ValueError, match="which this run writes into"):
        trainer.train()
    assert trainer.state.global_step == 0


@pytest.mark.fault
def test_a_users_folder_that_appears_at_the_good_checkpoint_path_is_never_removed(
    tmp_path: Path,
) -> None:
    target = tmp_path / "good"
    good = GoodCheckpoint(str(target), lambda path: Path(path).mkdir(), run_id="r1")
    assert rotate_good_checkpoint(good, 2) is None
    target.mkdir()
    (target / "notes.txt").write_text("precious")
    assert rotate_good_checkpoint(good, 4) is None
    assert good.refused is not None
    assert (target / "notes.txt").read_text() == "precious"
    assert rotate_good_checkpoint(good, 6) is None  # refused for the rest of the run


@pytest.mark.fault
def test_a_good_checkpoint_of_this_run_is_replaced_and_the_old_one_removed(
    tmp_path: Path,
) -> None:
    target = tmp_path / "good"

    def save(path: str) -> None:
        Path(path).mkdir()
        (Path(path) / "weights").write_text(str(len(list(tmp_path.iterdir()))))

    good = GoodCheckpoint(str(target), save, run_id="r1")
    for step in (2, 4, 6):
        rotate_good_checkpoint(good, step)
    names = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("."))
    assert names == ["good", "good.candidate"]
    assert GoodCheckpoint(str(target), save, run_id="r1").refused is None  # a resume takes it
    with pytest.raises(ValueError, match="another run's good checkpoint"):
        GoodCheckpoint(str(target), save, run_id="r2")


@pytest.mark.bad_input
@pytest.mark.parametrize("value", [5, 0.5, ["a"]])
def test_a_good_checkpoint_that_is_not_a_path_is_refused_at_construction(value: Any) -> None:
    with pytest.raises(TypeError, match="keep_good_checkpoint must be a path"):
        SpinalTrainerCallback(keep_good_checkpoint=value)


@pytest.mark.bad_input
def test_lightning_refuses_a_good_checkpoint_that_is_not_a_path() -> None:
    pytest.importorskip("lightning")
    from spinal_callback.integrations.lightning import SpinalCallback

    with pytest.raises(TypeError, match="keep_good_checkpoint must be a path"):
        SpinalCallback(keep_good_checkpoint=5)  # type: ignore[arg-type]


# ---- a resume writes only into the resuming run's own folder --------------------------------


@pytest.mark.fault
def test_a_copied_run_resumes_into_its_own_trace_file_and_leaves_the_original_alone(
    llama: PreTrainedModel, make_runner: Callable[..., Runner], tmp_path: Path
) -> None:
    original, copied = tmp_path / "A", tmp_path / "B"
    first = make_runner(llama, drift_every=1)
    FakeTrainer(first, llama, original).fit(max_steps=6)
    state = json.loads(json.dumps(first.state_dict()))
    shutil.copytree(original, copied)
    before = {p.name: p.read_bytes() for p in original.iterdir() if p.is_file()}

    resumed = make_runner(llama, drift_every=1)
    resumed.load_state_dict(state)
    FakeTrainer(resumed, llama, copied).fit(max_steps=10, start=6)
    assert {p.name: p.read_bytes() for p in original.iterdir() if p.is_file()} == before
    assert trace_steps(copied / "spinal_traces.jsonl")[-6:] == [0, 2, 4, 6, 8, 10]
    assert [trace.step for trace in resumed.traces] == [0, 2, 4, 6, 8, 10]


@pytest.mark.fault
def test_a_checkpoint_naming_another_file_never_writes_it(
    llama: PreTrainedModel, make_runner: Callable[..., Runner], tmp_path: Path
) -> None:
    first = make_runner(llama, drift_every=1)
    FakeTrainer(first, llama, tmp_path / "run").fit(max_steps=4)
    state = json.loads(json.dumps(first.state_dict()))
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    state["history"]["file"] = str(victim)
    state["drift"]["file"] = str(victim)

    resumed = make_runner(llama, drift_every=1)
    resumed.load_state_dict(state)
    FakeTrainer(resumed, llama, tmp_path / "run").fit(max_steps=6, start=4)
    assert victim.read_text() == "precious"
    assert [trace.step for trace in resumed.traces] == [0, 2, 4, 6]


# ---- one log dir, one run at a time ---------------------------------------------------------


def hold_lock_in_another_process(path: Path) -> subprocess.Popen[str]:
    code = (
        "import sys, time\n"
        "from spinal_callback.outputs.ownership import RunLock\n"
        "lock = RunLock(sys.argv[1], 'otherrun')\n"
        "print('held', flush=True)\n"
        "time.sleep(120)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(path)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    return holder


@pytest.mark.fault
@pytest.mark.parametrize("which", ["log dir", "event log"])
def test_a_second_process_writing_the_same_files_is_refused_at_train_begin(
    llama: PreTrainedModel, make_runner: Callable[..., Runner], tmp_path: Path, which: str
) -> None:
    log_dir, event_log = tmp_path / "logs", tmp_path / "shared" / "events.jsonl"
    lock = (
        log_dir / ".spinal.lock" if which == "log dir" else event_log.parent / ".events.jsonl.lock"
    )
    holder = hold_lock_in_another_process(lock)
    try:
        runner = make_runner(llama)
        with pytest.raises(RunConflictError, match=r"another run \(pid \d+, run otherrun\)"):
            runner.begin(0, Outputs(event_log=EventLog(event_log)), log_dir)
        assert runner.traces == [] and not event_log.exists()
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.fault
def test_a_run_that_ended_leaves_its_log_dir_to_the_next_run(
    llama: PreTrainedModel, make_runner: Callable[..., Runner], tmp_path: Path
) -> None:
    FakeTrainer(make_runner(llama), llama, tmp_path).fit(max_steps=2)
    FakeTrainer(make_runner(llama), llama, tmp_path).fit(max_steps=2)


@pytest.mark.fault
def test_a_run_in_a_log_dir_another_run_wrote_says_so_and_keeps_its_records(
    llama: PreTrainedModel,
    make_runner: Callable[..., Runner],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    first = make_runner(llama, stop_on=None)
    FakeTrainer(first, llama, tmp_path, losses=lambda s: 5.0).fit(max_steps=8)
    state = json.loads(json.dumps(first.state_dict()))
    records_before = EventLog(tmp_path / "events.jsonl").read()
    assert records_before
    second = make_runner(llama, stop_on=None)
    with caplog.at_level("WARNING", logger="spinal_callback"):
        FakeTrainer(second, llama, tmp_path, losses=lambda s: 5.0).fit(max_steps=8)
    assert f"already holds the traces of another run ({first.run_id})" in caplog.text
    # The first run resumes from its checkpoint: nothing of the second run is lost.
    records_between = EventLog(tmp_path / "events.jsonl").read()
    resumed = make_runner(llama)
    resumed.load_state_dict(state)
    FakeTrainer(resumed, llama, tmp_path, losses=lambda s: 0.6).fit(max_steps=8, start=4)
    records = EventLog(tmp_path / "events.jsonl").read()
    assert records[: len(records_between)] == records_between
    assert records_between[: len(records_before)] == records_before
    current = EventLog(tmp_path / "events.jsonl").read_current()
    assert [r for r in records if r["run"] == second.run_id] == [
        r for r in current if r["run"] == second.run_id
    ]
    lines = [json.loads(line) for line in (tmp_path / "spinal_traces.jsonl").open()]
    assert [line["trace"]["step"] for line in lines if line["run"] == second.run_id] == [
        0,
        2,
        4,
        6,
        8,
    ]


# ---- the event log is append-only: a resume supersedes, never deletes -----------------------


@pytest.mark.fault
def test_following_the_stop_advice_keeps_the_stop_on_record(
    make_dpo_trainer: Callable[..., Any], tmp_path: Path, make_model: Callable[..., Any]
) -> None:
    output = tmp_path / "run"
    stopped = SpinalTrainerCallback(every_n_steps=2)
    make_dpo_trainer(stopped, output_dir=output, extra_callbacks=[PoisonWeightsAt(7)]).train()
    log_dir = output / "runs" / "spinal"
    assert (8, "training_stopped") in rules_in(log_dir / "spinal_events.jsonl")
    assert "Resume from" in stopped.runner.resume_advice()
    before = EventLog(log_dir / "spinal_events.jsonl").read()

    time.sleep(1.1)  # a real resume is a later process: its event file sorts after
    resumed = SpinalTrainerCallback(every_n_steps=2)
    trainer = make_dpo_trainer(resumed, output_dir=output, model=make_model("llama", layers=4))
    trainer.train(resume_from_checkpoint=str(output / "checkpoint-6"))
    records = EventLog(log_dir / "spinal_events.jsonl").read()
    assert records[: len(before)] == before
    resume = [r for r in records if r["rule"] == RESUMED]
    assert len(resume) == 1 and resume[0]["step"] == 6
    assert "critical non_finite at step 8" in resume[0]["message"]
    assert "training_stopped at step 8" in resume[0]["message"]
    texts = EventAccumulator(str(log_dir), size_guidance={"tensors": 0})
    texts.Reload()
    shown = [
        event.tensor_proto.string_val[0].decode()
        for event in texts.Tensors("alerts/spinal")
        if event.step == 6
    ]
    assert any("`resumed`" in text and "training_stopped at step 8" in text for text in shown)


# ---- the charts after a resume --------------------------------------------------------------


@pytest.mark.fault
def test_the_highest_alert_level_so_far_survives_a_resume(
    llama: PreTrainedModel, make_runner: Callable[..., Runner], tmp_path: Path
) -> None:
    def fit(runner: Runner, max_steps: int, start: int, loss: float) -> None:
        board = TraceBoard.open(str(tmp_path / "tb"))
        outputs = Outputs(board, EventLog(tmp_path / "events.jsonl"), owns_board=True)
        runner.begin(start, outputs, tmp_path)
        for step in range(start + 1, max_steps + 1):
            runner.step(step)
            if step % 2 == 0:
                runner.logs(step, {"loss": loss})
        runner.end(max_steps)

    first = make_runner(llama, stop_on=None)
    fit(first, 8, 0, 5.0)  # critical preference_reversal from step 4
    assert first.worst_level == 3
    state = json.loads(json.dumps(first.state_dict()))
    time.sleep(1.1)
    resumed = make_runner(llama, stop_on=None)
    resumed.load_state_dict(state)
    fit(resumed, 12, 8, 0.6)
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    worst = {e.step: e.value for e in events.Scalars("spinal/alert_level_max")}
    assert worst[10] == 3.0 and worst[12] == 3.0


@pytest.mark.fault
def test_a_resume_hides_the_killed_segment_in_blocks_it_no_longer_probes(
    make_model: Callable[..., PreTrainedModel], make_runner: Callable[..., Runner], tmp_path: Path
) -> None:
    model = make_model("llama", layers=4)

    def fit(runner: Runner, max_steps: int, start: int) -> None:
        board = TraceBoard.open(str(tmp_path / "tb"))
        runner.begin(start, Outputs(board, owns_board=True), tmp_path)
        for step in range(start + 1, max_steps + 1):
            runner.step(step)
        runner.end(max_steps)

    first = make_runner(model, late_layers=[1, 2, 3])
    fit(first, 4, 0)
    state = json.loads(json.dumps(first.state_dict()))
    fit(first, 8, 4)  # the killed segment: steps 6 and 8
    time.sleep(1.1)
    resumed = make_runner(model, late_layers=[2, 3])
    resumed.load_state_dict(state)
    fit(resumed, 8, 4)
    dropped = EventAccumulator(str(tmp_path / "tb" / "L01"), size_guidance={"scalars": 0})
    dropped.Reload()
    assert [e.step for e in dropped.Scalars("spinal/contraction")] == [0, 2, 4]


# ---- one callback object, one run at a time -------------------------------------------------


@pytest.mark.fault
def test_a_callback_given_to_a_second_trainer_watches_a_new_run(
    make_dpo_trainer: Callable[..., Any], tmp_path: Path, make_model: Callable[..., Any]
) -> None:
    callback = SpinalTrainerCallback(every_n_steps=4)
    make_dpo_trainer(callback, output_dir=tmp_path / "a").train()
    first_run, first_reference = callback.runner.run_id, callback.runner.reference
    first_file = (tmp_path / "a" / "runs" / "spinal" / "spinal_traces.jsonl").read_bytes()

    second = make_model("llama", layers=4)
    make_dpo_trainer(callback, output_dir=tmp_path / "b", model=second).train()
    assert [trace.step for trace in callback.traces] == [0, 4, 8, 12]
    assert callback.runner.run_id != first_run
    assert callback.runner.reference is not first_reference
    assert trace_steps(tmp_path / "b" / "runs" / "spinal" / "spinal_traces.jsonl") == [0, 4, 8, 12]
    assert (tmp_path / "a" / "runs" / "spinal" / "spinal_traces.jsonl").read_bytes() == first_file


@pytest.mark.fault
def test_training_again_after_a_stop_trains(
    make_dpo_trainer: Callable[..., Any], tmp_path: Path
) -> None:
    callback = SpinalTrainerCallback(every_n_steps=2)
    trainer = make_dpo_trainer(callback, extra_callbacks=[PoisonWeightsAt(3)])
    healthy = copy.deepcopy(trainer.model.state_dict())
    trainer.train()
    assert trainer.state.global_step == 4 and callback.runner.stopped
    trainer.remove_callback(PoisonWeightsAt)
    trainer.model.load_state_dict(healthy)
    trainer.optimizer, trainer.lr_scheduler = None, None  # the stopped run's moments hold NaN
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert trainer.state.global_step == 12 and not callback.runner.stopped
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) == len(before)


# ---- bad arguments are refused before training ----------------------------------------------


@pytest.mark.bad_input
def test_a_reference_model_given_as_a_path_is_refused_at_construction() -> None:
    with pytest.raises(TypeError, match="from_pretrained"):
        SpinalTrainerCallback(ref_model="/some/path")  # type: ignore[arg-type]


@pytest.mark.bad_input
def test_a_reference_model_of_another_depth_is_refused_before_the_first_step(
    make_dpo_trainer: Callable[..., Any], make_model: Callable[..., Any]
) -> None:
    callback = SpinalTrainerCallback(ref_model=make_model("llama", layers=2))
    trainer = make_dpo_trainer(callback)
    with pytest.raises(ValueError, match="number of decoder blocks is 2 but the policy's is 4"):
        trainer.train()
    assert trainer.state.global_step == 0


@pytest.mark.bad_input
def test_a_reference_model_with_a_larger_vocabulary_is_refused_before_the_first_step(
    make_dpo_trainer: Callable[..., Any], make_model: Callable[..., Any]
) -> None:
    policy = make_model("llama", layers=4)
    reference = copy.deepcopy(policy)
    reference.resize_token_embeddings(reference.config.vocab_size + 64)
    trainer = make_dpo_trainer(SpinalTrainerCallback(ref_model=reference), model=policy)
    with pytest.raises(ValueError, match="vocabulary"):
        trainer.train()


@pytest.mark.bad_input
@pytest.mark.parametrize("hook", ["http://hook", 3])
def test_an_on_alert_that_is_not_callable_is_refused_at_construction(hook: Any) -> None:
    with pytest.raises(TypeError, match="on_alert must be a callable"):
        SpinalTrainerCallback(on_alert=hook)


@pytest.mark.fault
def test_training_again_with_a_good_checkpoint_is_refused_before_the_first_step(
    make_dpo_trainer: Callable[..., Any], tmp_path: Path
) -> None:
    good = tmp_path / "good"
    callback = SpinalTrainerCallback(every_n_steps=2, keep_good_checkpoint=str(good))
    trainer = make_dpo_trainer(callback, max_steps=6)
    trainer.train()
    kept = sorted(p.name for p in good.iterdir())
    with pytest.raises(ValueError, match="another run's good checkpoint"):
        trainer.train()
    assert trainer.state.global_step == 0
    assert sorted(p.name for p in good.iterdir()) == kept


@pytest.mark.fault
def test_a_torn_trace_line_costs_no_trace_at_a_later_resume(
    llama: PreTrainedModel, make_runner: Callable[..., Runner], tmp_path: Path
) -> None:
    first = make_runner(llama)
    FakeTrainer(first, llama, tmp_path).fit(max_steps=4)
    state = json.loads(json.dumps(first.state_dict()))
    with (tmp_path / "spinal_traces.jsonl").open("ab") as file:
        file.write(b'{"run": "torn by a kill')
    resumed = make_runner(llama)
    resumed.load_state_dict(state)
    FakeTrainer(resumed, llama, tmp_path).fit(max_steps=8, start=4)
    again = make_runner(llama)
    again.load_state_dict(json.loads(json.dumps(resumed.state_dict())))
    FakeTrainer(again, llama, tmp_path).fit(max_steps=10, start=8)
    assert [trace.step for trace in again.traces] == [0, 2, 4, 6, 8, 10]


@pytest.mark.fault
def test_a_trace_line_lost_after_a_restart_keeps_the_restarted_traces_inline(
    llama: PreTrainedModel,
    make_runner: Callable[..., Runner],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from spinal_callback.outputs import history

    runner = make_runner(llama)
    FakeTrainer(runner, llama, tmp_path).fit(max_steps=2)
    runner.history.restart()  # a new probe, as after the out-of-memory halving
    writes = {"failed": 0}
    original = history._append_line

    def fail_once(path: Path, line: bytes) -> None:
        if writes["failed"] == 0:
            writes["failed"] = 1
            raise OSError("disk full")
        original(path, line)

    monkeypatch.setattr(history, "_append_line", fail_once)
    runner.step(4)
    runner.step(6)
    state = json.loads(json.dumps(runner.state_dict()))
    restored = make_runner(llama)
    restored.load_state_dict(state)
    assert [trace.step for trace in restored.traces] == [4, 6]


@pytest.mark.fault
def test_every_rank_skips_the_good_checkpoints_save_when_the_main_one_finds_a_users_path(
    tmp_path: Path,
) -> None:
    saves: list[str] = []
    other_rank = GoodCheckpoint(str(tmp_path / "good"), saves.append, is_main=False, run_id="r1")
    assert rotate_good_checkpoint(other_rank, 2, agree=lambda flag: True) is None
    assert saves == [] and other_rank.refused is not None
    assert rotate_good_checkpoint(other_rank, 4, agree=lambda flag: False) is None
    assert saves == []  # refused for the rest of the run, on this rank too
