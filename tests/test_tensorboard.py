"""TraceBoard: TensorBoard output that never stops training, resume purges the UI honours, and
heatmaps of bounded cost that leave matplotlib's global state alone."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing import plugin_event_multiplexer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from spinal_callback.monitor.alerts import Alert
from spinal_callback.outputs.tensorboard import PREFIX, TraceBoard, block_name, custom_scalar_layout
from spinal_callback.probe.metrics import RAMP_SUMMARY_NAMES
from spinal_callback.probe.trace import DepthTrace

ROOT = Path(__file__).resolve().parents[1]
LOG_DIR = "/runs/fake"
RETRY_S = 30.0
TAG = f"{PREFIX}/ramp/jaggedness"
LAYER_RUN, LAYER_TAG = "L04", f"{PREFIX}/contraction"


def trace_at(step: int, layers: tuple[int, ...] = (4, 5, 6, 7)) -> DepthTrace:
    """A trace of a 8-block model at ``step`` whose scores encode the step."""
    count = len(layers)
    return DepthTrace(
        step=step,
        layers=list(layers),
        num_blocks=8,
        contraction=torch.full((count,), float(step)),
        transport=torch.full((count - 1,), 0.5),
        contraction_status=torch.zeros(count, dtype=torch.int8),
        summary={name: 0.0 for name in RAMP_SUMMARY_NAMES},
        measure="hellinger",
        model_fingerprint="m" * 16,
        probe_fingerprint="p" * 16,
    )


class FakeWriter:
    """A ``SummaryWriter`` stand-in: records the calls it accepts and raises ``OSError`` (disk
    full) from every method while ``failing``."""

    def __init__(self, log_dir: str = LOG_DIR) -> None:
        self.log_dir = log_dir
        self.failing = False
        self.calls: list[str] = []
        self.events: list[Any] = []

    def _accept(self, name: str) -> None:
        if self.failing:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.calls.append(name)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self._accept("add_scalar")

    def add_text(self, tag: str, text: str, step: int) -> None:
        self._accept("add_text")

    def add_custom_scalars(self, layout: dict[str, Any]) -> None:
        self._accept("add_custom_scalars")

    def add_image(self, tag: str, image: np.ndarray, step: int, dataformats: str) -> None:
        self._accept("add_image")

    def flush(self) -> None:
        self._accept("flush")

    def close(self) -> None:
        self._accept("close")

    def _get_file_writer(self) -> FakeWriter:
        self._accept("_get_file_writer")
        return self

    def add_event(self, event: Any) -> None:
        self._accept("add_event")
        self.events.append(event)


class Clock:
    """Monotonic seconds that move only when a test says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def an_alert(step: int = 3) -> Alert:
    return Alert(step, "warning", "rule", "metric", 1.0, 0.5, "message")


PUBLIC_WRITES: dict[str, Callable[[TraceBoard], None]] = {
    "write_trace": lambda board: board.write_trace(trace_at(2), trace_at(0)),
    "write_scalars": lambda board: board.write_scalars(2, {"spinal/drift/L00": 0.1}),
    "write_alerts": lambda board: board.write_alerts(2, [an_alert()]),
    "write_note": lambda board: board.write_note(2, "a note"),
    "write_alert_text": lambda board: board.write_alert_text(an_alert()),
    "write_heatmap": lambda board: board.write_heatmap([trace_at(1), trace_at(2)]),
    "purge_after": lambda board: board.purge_after(1),
    "flush": lambda board: board.flush(),
    "close": lambda board: board.close(),
}


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def writer() -> FakeWriter:
    return FakeWriter()


@pytest.fixture
def board(writer: FakeWriter, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> TraceBoard:
    """A board on ``writer``, whose per-block runs write to ``writer`` too."""
    monkeypatch.setattr("torch.utils.tensorboard.SummaryWriter", lambda log_dir: writer)
    return TraceBoard(writer, retry_after_s=RETRY_S, clock=clock)


@pytest.fixture
def records(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="spinal_callback")
    return caplog


def levels(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.levelname for record in caplog.records if record.name == "spinal_callback"]


def break_board(board: TraceBoard, writer: FakeWriter) -> None:
    writer.failing = True
    board.write_trace(trace_at(1))
    assert not board.healthy


# A failing writer (injected)


@pytest.mark.parametrize("method", sorted(PUBLIC_WRITES))
def test_no_public_method_raises_when_the_writer_fails(
    method: str, board: TraceBoard, writer: FakeWriter
) -> None:
    writer.failing = True
    PUBLIC_WRITES[method](board)
    assert not board.healthy


def test_the_first_failure_is_logged_once_at_error_with_the_directory_and_the_cause(
    board: TraceBoard, writer: FakeWriter, records: pytest.LogCaptureFixture
) -> None:
    writer.failing = True
    for write in PUBLIC_WRITES.values():
        write(board)
    errors = [record for record in records.records if record.levelno == logging.ERROR]
    assert len(errors) == 1
    assert LOG_DIR in errors[0].getMessage()
    assert "No space left on device" in errors[0].getMessage()


def test_writes_are_dropped_without_calling_the_writer_until_the_retry_is_due(
    board: TraceBoard, writer: FakeWriter, clock: Clock
) -> None:
    break_board(board, writer)
    writer.failing = False
    clock.now = RETRY_S - 1
    for write in PUBLIC_WRITES.values():
        write(board)
    assert writer.calls == []
    assert not board.healthy


def test_a_successful_retry_writes_again_and_logs_the_recovery_as_a_warning(
    board: TraceBoard, writer: FakeWriter, clock: Clock, records: pytest.LogCaptureFixture
) -> None:
    break_board(board, writer)
    writer.failing = False
    clock.now = RETRY_S
    board.write_alerts(5, [])
    assert board.healthy
    assert writer.calls == ["add_scalar", "add_scalar"]
    assert levels(records) == ["ERROR", "WARNING"]
    assert LOG_DIR in records.records[-1].getMessage()


def test_a_failed_retry_waits_another_interval_and_logs_nothing_new(
    board: TraceBoard, writer: FakeWriter, clock: Clock, records: pytest.LogCaptureFixture
) -> None:
    break_board(board, writer)
    clock.now = RETRY_S
    board.flush()
    writer.failing = False
    clock.now = 2 * RETRY_S - 1
    board.flush()
    assert writer.calls == []
    assert levels(records) == ["ERROR"]
    clock.now = 2 * RETRY_S
    board.flush()
    assert writer.calls == ["flush"]


def test_the_layout_is_written_once_the_writer_accepts_it(
    board: TraceBoard, writer: FakeWriter, clock: Clock
) -> None:
    break_board(board, writer)
    writer.failing = False
    clock.now = RETRY_S
    board.write_trace(trace_at(2))
    board.write_trace(trace_at(3))
    assert writer.calls.count("add_custom_scalars") == 1


def test_a_purge_asked_for_while_broken_is_written_before_the_next_successful_write(
    board: TraceBoard, writer: FakeWriter, clock: Clock
) -> None:
    break_board(board, writer)
    board.purge_after(20)
    writer.failing = False
    clock.now = RETRY_S
    board.write_alerts(22, [])
    assert writer.calls[:3] == ["_get_file_writer", "add_event", "add_event"]
    assert [event.step for event in writer.events] == [21, 21]


def test_close_flushes_a_borrowed_writer_but_leaves_it_open(
    board: TraceBoard, writer: FakeWriter
) -> None:
    board.close()
    assert writer.calls == ["flush"]


def test_a_negative_retry_interval_is_refused(writer: FakeWriter) -> None:
    with pytest.raises(ValueError, match="retry_after_s=-1"):
        TraceBoard(writer, retry_after_s=-1)


# An owned writer (TraceBoard.open)


class WriterFactory:
    """Stands in for ``SummaryWriter``: makes ``FakeWriter``s, or raises while ``refusing``."""

    def __init__(self) -> None:
        self.refusing = False
        self.made: list[FakeWriter] = []

    def __call__(self, log_dir: str) -> FakeWriter:
        if self.refusing:
            raise OSError(errno.EROFS, "Read-only file system", log_dir)
        self.made.append(FakeWriter(log_dir))
        return self.made[-1]


@pytest.fixture
def factory(monkeypatch: pytest.MonkeyPatch) -> WriterFactory:
    factory = WriterFactory()
    monkeypatch.setattr("torch.utils.tensorboard.SummaryWriter", factory)
    return factory


def test_open_creates_its_writer_at_the_first_write_not_before(
    factory: WriterFactory, clock: Clock
) -> None:
    board = TraceBoard.open(LOG_DIR, clock=clock)
    assert factory.made == []
    assert board.log_dir == LOG_DIR
    board.write_alerts(1, [])
    assert [writer.log_dir for writer in factory.made] == [LOG_DIR]


@pytest.mark.parametrize("method", sorted(PUBLIC_WRITES))
def test_no_public_method_raises_when_an_owned_writer_cannot_be_created(
    method: str, factory: WriterFactory, clock: Clock
) -> None:
    board = TraceBoard.open(LOG_DIR, clock=clock)
    factory.refusing = True
    PUBLIC_WRITES[method](board)
    assert factory.made == []


def test_flush_and_close_create_no_writer_before_the_first_write(
    factory: WriterFactory, clock: Clock
) -> None:
    board = TraceBoard.open(LOG_DIR, clock=clock)
    board.flush()
    board.close()
    assert factory.made == []
    assert board.healthy


def test_an_owned_writer_that_cannot_be_created_is_created_at_the_retry(
    factory: WriterFactory, clock: Clock, records: pytest.LogCaptureFixture
) -> None:
    board = TraceBoard.open(LOG_DIR, retry_after_s=RETRY_S, clock=clock)
    factory.refusing = True
    board.write_trace(trace_at(1))
    assert not board.healthy
    assert "Read-only file system" in records.records[0].getMessage()
    factory.refusing = False
    clock.now = RETRY_S
    board.write_trace(trace_at(2))
    assert board.healthy
    assert [writer.log_dir for writer in factory.made].count(LOG_DIR) == 1


def test_an_owned_writer_that_failed_is_closed_and_replaced_at_the_retry(
    factory: WriterFactory, clock: Clock
) -> None:
    board = TraceBoard.open(LOG_DIR, retry_after_s=RETRY_S, clock=clock)
    board.write_trace(trace_at(1))
    first = factory.made[0]
    first.failing = True
    board.flush()
    clock.now = RETRY_S
    board.write_trace(trace_at(2))
    assert board.healthy
    own = [writer for writer in factory.made if writer.log_dir == LOG_DIR]
    assert len(own) == 2
    assert "add_custom_scalars" in own[1].calls
    assert board.writer is own[1]


def test_close_closes_an_owned_writer(factory: WriterFactory, clock: Clock) -> None:
    board = TraceBoard.open(LOG_DIR, clock=clock)
    board.write_alerts(1, [])
    board.close()
    assert factory.made[0].calls[-1] == "close"
    assert board.writer is None


# Real faults: a read-only directory and a full disk, in a child process

FAULT_SCRIPT = r"""
import json, logging, os, subprocess, sys, threading
from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from spinal_callback.probe.metrics import RAMP_SUMMARY_NAMES
from spinal_callback.outputs.tensorboard import TraceBoard
from spinal_callback.probe.trace import DepthTrace

mode, root = sys.argv[1], Path(sys.argv[2])
records = []


class Keep(logging.Handler):
    def emit(self, record):
        records.append([record.levelname, record.getMessage()])


logger = logging.getLogger("spinal_callback")
logger.addHandler(Keep())
logger.setLevel(logging.INFO)


def trace_at(step):
    return DepthTrace(
        step=step, layers=[4, 5, 6, 7], num_blocks=8,
        contraction=torch.full((4,), float(step)), transport=torch.full((3,), 0.5),
        contraction_status=torch.zeros(4, dtype=torch.int8),
        summary={name: 0.0 for name in RAMP_SUMMARY_NAMES}, measure="hellinger",
        model_fingerprint="m" * 16, probe_fingerprint="p" * 16,
    )


now = [0.0]
log_dir = root / "run"
board = TraceBoard.open(str(log_dir), retry_after_s=60.0, clock=lambda: now[0])
history = []


def probe(step):
    history.append(trace_at(step))
    board.write_trace(history[-1])
    board.write_heatmap(history)
    board.flush()


result = {"raised": None}
try:
    if mode == "full":
        free = os.statvfs(root).f_bavail * os.statvfs(root).f_frsize
        filler = root / "filler"
        filler.write_bytes(b"\0" * (free - 64 * 1024))
        step = 0
        while board.healthy and step < 200:
            step += 1
            probe(step)
        result["failed_at_probe"] = step
        filler.unlink()
    else:
        probe(1)
        result["failed_at_probe"] = 1 if not board.healthy else None
        if mode == "read_only_mount":
            subprocess.run(["mount", "-o", "remount,rw", str(root)], check=True)
        else:
            root.chmod(0o700)
        step = 1
    probe(step + 1)
    result["healthy_before_the_retry_is_due"] = board.healthy
    now[0] += 60.0
    probe(step + 2)
    result["healthy_after_the_retry"] = board.healthy
    result["last_step"] = step + 2
    board.close()
    accumulator = EventAccumulator(str(log_dir))
    accumulator.Reload()
    result["steps_read_back"] = [event.step for event in accumulator.Scalars("TAG")]
except BaseException as error:
    result["raised"] = repr(error)
result["records"] = records
result["threads"] = threading.active_count()
print(json.dumps(result))
""".replace("TAG", TAG)


def run_fault_script(mode: str, root: Path, mount: str | None) -> dict[str, Any]:
    """Run the script in a child process, under ``unshare -rm`` with ``mount`` options for a
    tmpfs on ``root`` when given."""
    script = root.parent / "fault_script.py"
    script.write_text(FAULT_SCRIPT)
    command = [sys.executable, str(script), mode, str(root)]
    if mount is not None:
        shell = f"mount -t tmpfs -o {mount} tmpfs {root} && exec {' '.join(command)}"
        command = ["unshare", "-rm", "sh", "-c", shell]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def skip_without_tmpfs_mounts(root: Path) -> None:
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1) to mount a tmpfs as an unprivileged user")
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {root}"],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a user namespace here: {probe.stderr.strip()}")


@pytest.fixture
def fault_root(tmp_path: Path) -> Path:
    root = tmp_path / "logs"
    root.mkdir()
    return root


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["read_only_mount", "read_only_chmod"])
@pytest.mark.fault
def test_a_read_only_log_dir_costs_output_until_it_is_writable_again(
    mode: str, fault_root: Path
) -> None:
    if mode == "read_only_mount":
        skip_without_tmpfs_mounts(fault_root)
        result = run_fault_script(mode, fault_root, mount="ro,size=1m")
        cause = "[Errno 30]"
    else:
        if os.geteuid() == 0:
            pytest.skip("root ignores directory permissions; the read-only mount case covers it")
        fault_root.chmod(0o500)
        result = run_fault_script(mode, fault_root, mount=None)
        cause = "[Errno 13]"
    assert result["raised"] is None
    assert result["failed_at_probe"] == 1
    assert result["healthy_before_the_retry_is_due"] is False
    assert result["healthy_after_the_retry"] is True
    assert [level for level, _ in result["records"]] == ["ERROR", "WARNING"]
    assert str(fault_root / "run") in result["records"][0][1]
    assert cause in result["records"][0][1]
    assert result["steps_read_back"] == [result["last_step"]]
    assert result["threads"] == 1, "a failed writer's thread outlived it"


@pytest.mark.slow
@pytest.mark.fault
def test_a_full_disk_costs_output_until_space_returns(fault_root: Path) -> None:
    skip_without_tmpfs_mounts(fault_root)
    result = run_fault_script("full", fault_root, mount="size=256k")
    assert result["raised"] is None
    assert result["failed_at_probe"] < 200
    assert result["healthy_before_the_retry_is_due"] is False
    assert result["healthy_after_the_retry"] is True
    assert [level for level, _ in result["records"]] == ["ERROR", "WARNING"]
    assert "[Errno 28]" in result["records"][0][1]
    steps = result["steps_read_back"]
    assert steps[-1] == result["last_step"]
    assert steps == sorted(set(steps))
    assert result["threads"] == 1, "a failed writer's thread outlived it"


# Resume purge, as the TensorBoard UI reads it


def write_interrupted_then_resumed_run(log_dir: Path, board_for: Callable[[], TraceBoard]) -> None:
    """Steps 0..24 (every 2) by a first run, then a run resumed from 20 writes 22..26."""
    first = board_for()
    for step in range(0, 25, 2):
        first.write_alerts(step, [])
        first.write_trace(trace_at(step))
    finish(first)
    resumed = board_for()
    resumed.purge_after(20)
    for step in range(22, 27, 2):
        resumed.write_alerts(step, [])
        resumed.write_trace(trace_at(step))
    finish(resumed)


def finish(board: TraceBoard) -> None:
    """End a run: the board's writers closed, a borrowed one too (as its owner would)."""
    writer = board.writer
    board.close()
    if writer is not None:
        writer.close()


def ui_steps(log_dir: Path, tag: str, run: str = ".") -> list[int]:
    """Steps of ``tag`` in ``run`` as the UI's data provider reads them (plugin event
    multiplexer)."""
    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(log_dir))
    multiplexer.Reload()
    return [event.step for event in multiplexer.Tensors(run, tag)]


def legacy_steps(log_dir: Path, tag: str, run: str = ".") -> list[int]:
    accumulator = EventAccumulator(str(log_dir / run))
    accumulator.Reload()
    return [event.step for event in accumulator.Scalars(tag)]


RESUMED_STEPS = list(range(0, 27, 2))


@pytest.mark.parametrize("reader", [ui_steps, legacy_steps], ids=["ui", "legacy"])
@pytest.mark.parametrize("tag", [TAG, f"{PREFIX}/alert_level"])
def test_after_a_resume_each_step_shows_once_in_order(
    tmp_path: Path, reader: Callable[[Path, str], list[int]], tag: str
) -> None:
    write_interrupted_then_resumed_run(tmp_path, lambda: TraceBoard(SummaryWriter(tmp_path)))
    assert reader(tmp_path, tag) == RESUMED_STEPS


@pytest.mark.parametrize("reader", [ui_steps, legacy_steps], ids=["ui", "legacy"])
def test_after_a_resume_each_block_run_shows_each_step_once_in_order(
    tmp_path: Path, reader: Callable[[Path, str, str], list[int]]
) -> None:
    write_interrupted_then_resumed_run(tmp_path, lambda: TraceBoard(SummaryWriter(tmp_path)))
    assert reader(tmp_path, LAYER_TAG, LAYER_RUN) == RESUMED_STEPS


def test_the_purge_works_through_an_owned_writer(tmp_path: Path) -> None:
    write_interrupted_then_resumed_run(tmp_path, lambda: TraceBoard.open(str(tmp_path)))
    assert ui_steps(tmp_path, TAG) == RESUMED_STEPS
    assert ui_steps(tmp_path, LAYER_TAG, LAYER_RUN) == RESUMED_STEPS


def test_the_purge_also_hides_newer_heatmaps(tmp_path: Path) -> None:
    first = TraceBoard(SummaryWriter(tmp_path))
    history = [trace_at(step) for step in range(0, 25, 2)]
    for end in range(1, len(history) + 1):
        first.write_heatmap(history[:end])
    first.writer.close()
    resumed = TraceBoard(SummaryWriter(tmp_path))
    resumed.purge_after(20)
    resumed.write_heatmap([*history[:11], trace_at(22)])
    resumed.writer.close()
    assert ui_steps(tmp_path, f"{PREFIX}/depth_trace") == [*range(0, 23, 2)]


# Heatmaps


def test_a_heatmap_never_switches_the_matplotlib_backend(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    switched: list[str] = []
    monkeypatch.setattr(matplotlib, "use", lambda backend, **_: switched.append(backend))
    board = TraceBoard.open(str(tmp_path))
    board.write_heatmap([trace_at(1), trace_at(2)])
    board.close()
    assert switched == []


@pytest.mark.slow
def test_a_heatmap_leaves_the_users_backend_and_pyplot_alone(tmp_path: Path) -> None:
    script = (
        "import sys, matplotlib\n"
        "from tests.test_tensorboard import trace_at\n"
        "from spinal_callback.outputs.tensorboard import TraceBoard\n"
        f"board = TraceBoard.open({str(tmp_path)!r})\n"
        "board.write_heatmap([trace_at(1), trace_at(2)])\n"
        "board.close()\n"
        "print('matplotlib.pyplot' in sys.modules, matplotlib.get_backend(), board.healthy)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "pdf"}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "pdf", "True"]


def test_a_heatmap_lands_as_an_rgb_image_at_the_last_step(tmp_path: Path) -> None:
    board = TraceBoard.open(str(tmp_path))
    board.write_heatmap([trace_at(1), trace_at(5)])
    board.close()
    accumulator = EventAccumulator(str(tmp_path))
    accumulator.Reload()
    (image,) = accumulator.Images(f"{PREFIX}/depth_trace")
    assert (image.step, image.width, image.height) == (5, 480, 480)


def test_every_alert_of_a_step_shows_in_the_text_tab_not_only_the_last(tmp_path: Path) -> None:
    """The text tab shows one entry per tag and step: the last written. A stop record written
    after the alert that caused it, and the logs' alert after that, must not hide either."""
    board = TraceBoard.open(str(tmp_path))

    def alert(rule: str, message: str, step: int = 6) -> Alert:
        nan = float("nan")
        return Alert(step, "critical", rule, "spinal/x", nan, nan, message)

    board.write_alert_text(alert("non_finite", "trace overflowed", step=4))
    for rule, message in [
        ("non_finite", "trace overflowed"),
        ("training_stopped", "training stopped at step 6"),
        ("non_finite", "logs overflowed"),
    ]:
        board.write_alert_text(alert(rule, message))
    board.close()
    events = EventAccumulator(str(tmp_path), size_guidance={"tensors": 0})
    events.Reload()
    shown = {e.step: e.tensor_proto.string_val[0].decode() for e in events.Tensors("alerts/spinal")}
    assert "trace overflowed" in shown[6] and "training stopped at step 6" in shown[6]
    assert "logs overflowed" in shown[6] and shown[4].count("overflowed") == 1


# What TensorBoard shows: runs, tags, layout


def written_runs(log_dir: Path) -> dict[str, set[str]]:
    """Run name -> scalar tags, as the UI's data provider reads them."""
    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(log_dir))
    multiplexer.Reload()
    return {run: set(tags["tensors"]) for run, tags in multiplexer.Runs().items()}


def test_each_late_block_is_its_own_run_holding_both_scores_under_one_tag(tmp_path: Path) -> None:
    board = TraceBoard.open(str(tmp_path))
    board.write_trace(trace_at(2), trace_at(0))
    board.close()
    runs = written_runs(tmp_path)
    assert sorted(runs) == [".", "L04", "L05", "L06", "L07", "reference"]
    for run in ("L04", "L05", "L06"):
        assert runs[run] == {f"{PREFIX}/contraction", f"{PREFIX}/transport"}
    assert runs["L07"] == {f"{PREFIX}/contraction"}, "the deepest block has no next block"
    assert runs["reference"] == {f"{PREFIX}/ramp/{name}" for name in RAMP_SUMMARY_NAMES}
    assert not any("/L0" in tag for tag in runs["."]), "no per-block tag in the main run"


def test_block_runs_sort_in_depth_order_for_models_with_a_hundred_blocks_or_more() -> None:
    assert [block_name(layer, 120) for layer in (7, 99, 119)] == ["L007", "L099", "L119"]
    assert block_name(3, 8) == "L03"


def test_the_highest_alert_level_so_far_stays_up_after_the_alert() -> None:
    writer = FakeWriter()
    scalars: list[tuple[str, float, int]] = []
    writer.add_scalar = lambda tag, value, step: scalars.append((tag, value, step))  # type: ignore[method-assign]
    board = TraceBoard(writer)
    for step, alerts in [(1, []), (2, [an_alert(2)]), (3, [])]:
        board.write_alerts(step, alerts)
    highest = [value for tag, value, _ in scalars if tag == f"{PREFIX}/alert_level_max"]
    current = [value for tag, value, _ in scalars if tag == f"{PREFIX}/alert_level"]
    assert (current, highest) == ([0, 2, 0], [0, 2, 2])


def test_alerts_and_notes_show_under_their_plain_tags_in_the_text_tab(tmp_path: Path) -> None:
    board = TraceBoard.open(str(tmp_path))
    board.write_alert_text(an_alert(3))
    board.write_note(3, "a note")
    board.close()
    events = EventAccumulator(str(tmp_path), size_guidance={"tensors": 0})
    events.Reload()
    assert {"alerts/spinal", f"{PREFIX}/notes"} <= set(events.Tags()["tensors"])


def test_the_layout_puts_the_alerts_first_and_one_chart_per_score_for_every_block() -> None:
    layout = custom_scalar_layout([4, 5, 6, 7])
    assert next(iter(layout)) == "SPINAL alerts"
    (stop_chart, alert_chart, *_) = layout["SPINAL alerts"].values()
    assert stop_chart == ["Multiline", [rf"^{PREFIX}/stopped$"]]
    assert alert_chart == ["Multiline", [rf"^{PREFIX}/(alert_level(_max)?|recoveries)$"]]
    charts = layout["SPINAL depth trace (a line per late block)"]
    assert charts["contraction of blocks 4-7"] == ["Multiline", [rf"^{PREFIX}/contraction$"]]
    assert charts["transport from each block to the next, 4->5 to 6->7"] == [
        "Multiline",
        [rf"^{PREFIX}/transport$"],
    ]
