"""When the runner probes: a fixed interval, or the automatic cadence set by a time budget."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from test_runner import FakeTrainer
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from spinal_callback.config import SpinalConfig
from spinal_callback.demos.tiny import build_tiny_model
from spinal_callback.training.cadence import Cadence, agree_on_max
from spinal_callback.training.runner import HEAVY_LENS, Runner


class Clock:
    """Seconds that pass only when a test says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def never(flag: bool) -> bool:
    return flag  # one rank: the collective returns this rank's own flag


def trained(cadence: Cadence, clock: Clock, steps: int, seconds: float) -> None:
    for _ in range(steps):
        clock.now += seconds
        cadence.step_event()


# ---- the schedule ----------------------------------------------------------------------------


def test_a_fixed_interval_probes_at_its_multiples() -> None:
    cadence = Cadence(SpinalConfig(every_n_steps=25))
    assert [step for step in range(1, 101) if cadence.due(step, 0)] == [25, 50, 75, 100]
    assert not cadence.due(50, 50)  # a step already probed


def test_the_automatic_cadence_first_probes_at_its_floor_whatever_the_hardware() -> None:
    cadence = Cadence(SpinalConfig(every_n_steps="auto", auto_min_steps=10))
    assert cadence.interval == 10
    assert next(step for step in range(1, 30) if cadence.due(step, 0)) == 10


def test_the_interval_keeps_the_probes_within_the_budget() -> None:
    clock = Clock()
    cadence = Cadence(SpinalConfig(every_n_steps="auto", overhead_budget=0.01), clock)
    trained(cadence, clock, 10, seconds=0.5)
    note = cadence.probed(0.2, never)  # 0.2 s / (1% of 0.5 s) = 40 steps
    assert cadence.interval == 40
    assert note is not None and "probe interval now 40 steps" in note
    assert "0.99%" in note  # 0.2 / (0.2 + 40 x 0.5)
    assert cadence.due(50, 10) and not cadence.due(49, 10)
    assert cadence.probed(0.2, never) is None  # unchanged: no new note
    assert cadence.probed(0.22, never) is None and cadence.interval == 40  # 44: within 20%
    assert cadence.probed(0.3, never) is not None and cadence.interval == 60


@pytest.mark.parametrize(
    ("probe_seconds", "interval", "says"),
    [
        (5.0, 100, "above the ceiling auto_max_steps=100: raise auto_max_steps to 1000"),
        (0.001, 10, "the floor auto_min_steps=10"),
    ],
)
def test_the_interval_stays_between_the_floor_and_the_ceiling(
    probe_seconds: float, interval: int, says: str
) -> None:
    clock = Clock()
    cadence = Cadence(SpinalConfig(every_n_steps="auto"), clock)
    cadence.interval = 50
    trained(cadence, clock, 10, seconds=0.5)
    note = cadence.probed(probe_seconds, never)
    assert cadence.interval == interval
    assert note is not None and says in note


def test_the_runners_own_work_is_not_counted_as_training() -> None:
    clock = Clock()
    cadence = Cadence(SpinalConfig(every_n_steps="auto"), clock)
    for _ in range(10):
        clock.now += 1.5
        cadence.own_work(1.0)  # e.g. scoring the trainer's logs
        cadence.step_event()
    assert list(cadence.step_seconds) == [0.5] * 9  # the first event only starts the clock


def test_ranks_agree_on_the_largest_interval_through_the_boolean_collective() -> None:
    values = [13, 57, 40, 10]
    barrier = threading.Barrier(len(values))
    flags: list[bool] = []
    lock = threading.Lock()
    results: dict[int, int] = {}

    def reduce_any(flag: bool) -> bool:
        with lock:
            flags.append(flag)
        barrier.wait()
        answer = any(flags)
        barrier.wait()
        with lock:
            flags.clear()
        barrier.wait()
        return answer

    def rank(index: int) -> None:
        results[index] = agree_on_max(values[index], 7, reduce_any)

    threads = [threading.Thread(target=rank, args=(i,)) for i in range(len(values))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert results == {0: 57, 1: 57, 2: 57, 3: 57}


def test_a_resumed_automatic_cadence_goes_on_at_its_interval() -> None:
    config = SpinalConfig(every_n_steps="auto")
    saved = Cadence(config)
    saved.interval = 70
    resumed = Cadence(config)
    resumed.load_state_dict(saved.state_dict())
    assert resumed.interval == 70
    fixed = Cadence(SpinalConfig(every_n_steps=30))
    fixed.load_state_dict(saved.state_dict())
    assert fixed.interval == 30  # a fixed interval is the user's: a checkpoint does not change it


# ---- in the runner ---------------------------------------------------------------------------


def test_the_runner_probes_at_the_floor_then_at_the_interval_the_budget_allows(
    llama: PreTrainedModel, make_runner: Callable[..., Runner], tmp_path: Path
) -> None:
    # A fake training step takes well under a millisecond and a probe tens of them: 1% of the
    # run allows a probe only every few thousand steps, so the interval goes to the ceiling.
    runner = make_runner(llama, every_n_steps="auto", auto_min_steps=10, auto_max_steps=30)
    FakeTrainer(runner, llama, tmp_path).fit(max_steps=75)
    assert [trace.step for trace in runner.traces] == [0, 10, 40, 70, 75]
    assert runner.every_n_steps == 30
    assert runner.pop_scalars()["spinal/every_n_steps"] == 30.0
    assert runner.state_dict()["cadence"] == {"interval": 30, "auto": True}


# ---- configuration ---------------------------------------------------------------------------


def test_every_n_steps_takes_an_int_or_auto() -> None:
    assert SpinalConfig(every_n_steps="auto").every_n_steps == "auto"
    assert SpinalConfig(every_n_steps="25").every_n_steps == 25  # YAML 1.1 reads some as strings


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("fields", "error", "says"),
    [
        ({"every_n_steps": "often"}, TypeError, "an int (a string of digits"),
        ({"every_n_steps": 0}, ValueError, "every_n_steps must be an int >= 1"),
        ({"overhead_budget": 0.0}, ValueError, "overhead_budget must be in (0, 1)"),
        ({"overhead_budget": 1.5}, ValueError, "overhead_budget must be in (0, 1)"),
        ({"auto_min_steps": 50, "auto_max_steps": 20}, ValueError, "auto_max_steps must be"),
    ],
)
def test_a_bad_cadence_is_refused_at_construction(
    fields: dict[str, object], error: type[Exception], says: str
) -> None:
    with pytest.raises(error, match=says.replace("(", r"\(").replace(")", r"\)")):
        SpinalConfig(**fields)  # type: ignore[arg-type]


# ---- short probe texts -----------------------------------------------------------------------


def test_setup_warns_when_short_probe_texts_make_the_lens_outweigh_the_forward(
    tokenizer: PreTrainedTokenizerFast,
    probe_texts: list[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A wide vocabulary on a narrow model, as in real LMs (SmolLM2: 49,152 x 576): every lens
    # token costs a head projection at each late block.
    model = build_tiny_model("llama", vocab_size=20_000, hidden=64, layers=8)
    short = [" ".join(text.split()[:4]) for text in probe_texts]
    with caplog.at_level(logging.WARNING, logger="spinal_callback"):
        runner = Runner(SpinalConfig(), short)
        runner.setup(model, tokenizer)
    assert runner.probe is not None
    work = runner.probe.lens_work()
    assert work is not None and work > HEAVY_LENS
    warning = next(
        r.getMessage() for r in caplog.records if "probe texts are short" in r.getMessage()
    )
    assert f"{work:.1f}x the multiply-adds" in warning
    assert "every_n_steps='auto'" in warning


def test_paragraph_long_probe_texts_raise_no_such_warning(
    tokenizer: PreTrainedTokenizerFast,
    probe_texts: list[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = build_tiny_model("llama", vocab_size=20_000, hidden=64, layers=8)
    paragraphs = [" ".join([text] * 8) for text in probe_texts]
    with caplog.at_level(logging.WARNING, logger="spinal_callback"):
        runner = Runner(SpinalConfig(), paragraphs)
        runner.setup(model, tokenizer)
    assert runner.probe is not None and (runner.probe.lens_work() or 0.0) < HEAVY_LENS
    assert not any("probe texts are short" in r.getMessage() for r in caplog.records)


def test_both_callbacks_take_the_automatic_cadence_and_its_budget() -> None:
    from spinal_callback.integrations.lightning import SpinalCallback
    from spinal_callback.integrations.transformers import SpinalTrainerCallback

    for callback in (
        SpinalTrainerCallback(every_n_steps="auto", overhead_budget=0.02),
        SpinalCallback(every_n_steps="auto", overhead_budget=0.02),
    ):
        assert callback.config.every_n_steps == "auto"
        assert callback.config.overhead_budget == 0.02
