"""A checkpoint saved by an earlier release resumes: its state, trace history and drift
reference are read into today's layout (``training.state.upgrade_state``).

The fixtures were written by the runner of each commit named (``tests/data/checkpoints``): a tiny
Llama probed at steps 0, 2 and 4, checkpointed at step 4, with the drift on.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from spinal_callback.config import SpinalConfig
from spinal_callback.demos.tiny import DEFAULT_PROBE_TEXTS, build_tiny_model
from spinal_callback.outputs.event_log import EventLog
from spinal_callback.outputs.sinks import Outputs
from spinal_callback.training.runner import Runner
from spinal_callback.training.state import STATE_VERSION, saved_state, upgrade_state

DATA = Path(__file__).parent / "data" / "checkpoints"
RELEASES = {"07051a2": 2, "9e5933b": 3}


def resume(saved_by: str, directory: Path, tokenizer: PreTrainedTokenizerFast) -> Runner:
    shutil.copytree(DATA / saved_by, directory)
    state = json.loads((directory / "state.json").read_text())
    # Resumed on the machine that saved it: the drift file the state names is where it was.
    state["drift"]["file"] = str(directory / Path(state["drift"]["file"]).name)
    model = build_tiny_model("llama", vocab_size=len(tokenizer), layers=4)
    runner = Runner(SpinalConfig(every_n_steps=2, drift_every=1), list(DEFAULT_PROBE_TEXTS))
    runner.setup(model, tokenizer)
    runner.load_state_dict(state)
    runner.begin(4, Outputs(event_log=EventLog(directory / "spinal_events.jsonl")), directory)
    return runner


@pytest.mark.parametrize("saved_by", sorted(RELEASES))
def test_the_fixture_is_the_state_version_of_its_release(saved_by: str) -> None:
    state = json.loads((DATA / saved_by / "state.json").read_text())
    assert state["version"] == RELEASES[saved_by] < STATE_VERSION


@pytest.mark.parametrize("saved_by", sorted(RELEASES))
def test_a_checkpoint_of_an_earlier_release_resumes_where_it_stopped(
    saved_by: str,
    tokenizer: PreTrainedTokenizerFast,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    saved = json.loads((DATA / saved_by / "state.json").read_text())
    with caplog.at_level(logging.WARNING, logger="spinal_callback"):
        runner = resume(saved_by, tmp_path / "run", tokenizer)
        runner.step(6)
    assert [trace.step for trace in runner.traces] == [0, 2, 4, 6]
    assert runner.reference is not None and runner.reference.to_dict() == saved["reference"]
    assert runner.monitor.probes_seen == 4
    assert runner.drift is not None and runner.drift.reference is not None
    assert "changed" not in caplog.text and "missing" not in caplog.text
    assert "checkpoint-4 (step 4)" in runner.resume_advice()


def test_an_upgraded_state_keeps_one_copy_of_the_reference() -> None:
    saved = json.loads((DATA / "07051a2" / "state.json").read_text())
    assert "reference" in saved["monitor"]  # version 2 stored it twice
    upgraded = upgrade_state(saved)
    assert "reference" not in upgraded["baseline"]["monitor"]
    assert upgraded["baseline"]["reference"] == saved["reference"]


def test_a_state_of_a_newer_release_is_refused_naming_both_versions() -> None:
    with pytest.raises(ValueError, match=f"version {STATE_VERSION + 1} is newer than"):
        upgrade_state({"version": STATE_VERSION + 1})


def test_the_state_is_found_under_its_key_or_the_first_releases_class_name_entry() -> None:
    state = {"version": STATE_VERSION}
    assert saved_state({"spinal_callback": state}, "spinal_callback", "Cb") == state
    legacy = {"Cb": [{"attributes": {"spinal_state": state}}]}
    assert saved_state(legacy, "spinal_callback", "Cb") == state
    assert saved_state({"Other": {}}, "spinal_callback", "Cb") is None
    assert saved_state(None, "spinal_callback", "Cb") is None
