"""Distributed training for real: two CPU processes over gloo.

DDP with TRL's ``DPOTrainer`` (launched with torchrun) and with Lightning (``strategy="ddp"``,
which re-launches its script): every rank probes the same probe at the same steps, only rank zero
writes TensorBoard, and no rank waits on a collective another rank skips. FSDP (``fully_shard``
and FSDP v1): the probe gathers the sharded parameters on every rank and reproduces the unsharded
model's trace. Each run is a script under ``tests/distributed/`` writing one JSON per rank.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from spinal_callback.outputs.event_log import EventLog

SCRIPTS = Path(__file__).parent / "distributed"
REPO = Path(__file__).resolve().parents[1]
WORLD_SIZE = 2
RUN_TIMEOUT_S = 300
PROBE_TAG = "spinal/ramp/transport_mean"
# Variables a surrounding launcher may have set; the child runs must start their own group.
LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK")

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="this torch build has no torch.distributed gloo backend",
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def run_processes(
    arguments: list[str], port: int, log: Path, timeout: float = RUN_TIMEOUT_S
) -> None:
    """Run ``python <arguments>`` with its output in ``log``; fail the test with the output's tail
    on a non-zero exit or a timeout, and leave no process of the run behind."""
    environment = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    environment.update(
        PYTHONPATH=os.pathsep.join([str(REPO), environment.get("PYTHONPATH", "")]),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
    )
    with log.open("w") as output:
        process = subprocess.Popen(
            [sys.executable, *arguments],
            cwd=REPO,
            env=environment,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_process_tree(process.pid)
            process.wait()
            pytest.fail(f"{arguments[0]} did not finish within {timeout:.0f} s:\n{tail(log)}")
        finally:
            kill_process_tree(process.pid)
    if process.returncode != 0:
        pytest.fail(f"{arguments[0]} exited with {process.returncode}:\n{tail(log)}")


def kill_process_tree(pid: int) -> None:
    """SIGKILL ``pid``'s descendants, then its process group (the session this test started).

    torchrun starts each rank in a session of its own, so the group alone would miss them.
    """
    for victim in descendants(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def descendants(pid: int) -> list[int]:
    """Live processes below ``pid``, read from ``/proc`` (empty where there is none)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(stat.parent.name))
    found: list[int] = []
    pending = [pid]
    while pending:
        below = children.get(pending.pop(), [])
        found.extend(below)
        pending.extend(below)
    return found


def tail(log: Path, characters: int = 6000) -> str:
    return log.read_text(errors="replace")[-characters:]


def torchrun(
    script: str, out_dir: Path, *options: str, timeout: float = RUN_TIMEOUT_S
) -> list[dict[str, Any]]:
    """``WORLD_SIZE`` processes of ``tests/distributed/<script> out_dir *options`` under one
    torchrun agent, killed after ``timeout`` seconds; the records of every rank."""
    port = free_port()
    run_processes(
        [
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={WORLD_SIZE}",
            "--master_addr=127.0.0.1",
            f"--master_port={port}",
            str(SCRIPTS / script),
            str(out_dir),
            *options,
        ],
        port,
        out_dir / "launch.log",
        timeout=timeout,
    )
    return rank_records(out_dir)


def lightning_run(out_dir: Path, *options: str) -> list[dict[str, Any]]:
    arguments = [str(SCRIPTS / "lightning_dpo_ddp_run.py"), str(out_dir), *options]
    run_processes(arguments, free_port(), out_dir / "launch.log")
    return rank_records(out_dir)


def rank_records(out_dir: Path) -> list[dict[str, Any]]:
    """The JSON each rank wrote, in rank order."""
    records = [json.loads(path.read_text()) for path in sorted(out_dir.glob("rank*.json"))]
    assert [record["rank"] for record in records] == list(range(WORLD_SIZE))
    return records


def event_files(directory: Path) -> list[Path]:
    return sorted(directory.rglob("events.out.tfevents.*"))


def logged_steps(directory: Path, tag: str = PROBE_TAG) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory), size_guidance={"scalars": 0})
    events.Reload()
    return [event.step for event in events.Scalars(tag)]


# --- TRL DPOTrainer under torchrun -----------------------------------------------------------


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    pytest.importorskip("trl")
    out_dir = tmp_path_factory.mktemp("hf_ddp")
    return out_dir, torchrun("trl_ddp_run.py", out_dir, "--max-steps", "8")


def test_hf_ddp_trains_wrapped_in_ddp_on_both_ranks(
    hf_run: tuple[Path, list[dict[str, Any]]],
) -> None:
    _, records = hf_run
    assert [r["world_size"] for r in records] == [WORLD_SIZE] * WORLD_SIZE
    assert [r["model_class"] for r in records] == ["DistributedDataParallel"] * WORLD_SIZE
    assert [r["global_step"] for r in records] == [8] * WORLD_SIZE


def test_hf_ddp_every_rank_probes_the_same_probe_at_the_same_steps(
    hf_run: tuple[Path, list[dict[str, Any]]],
) -> None:
    _, records = hf_run
    assert [r["probe_steps"] for r in records] == [[0, 4, 8]] * WORLD_SIZE
    assert records[0]["transport_mean"] == records[1]["transport_mean"]


def test_hf_ddp_every_rank_takes_rank_zeros_run_id(
    hf_run: tuple[Path, list[dict[str, Any]]],
) -> None:
    _, records = hf_run
    assert len({r["run_id"] for r in records}) == 1


@pytest.mark.fault
def test_hf_ddp_the_event_logs_of_every_rank_carry_one_run_id(tmp_path: Path) -> None:
    pytest.importorskip("trl")
    options = ("--max-steps", "12", "--poison-rank", "1", "--poison-step", "4")
    torchrun("trl_ddp_run.py", tmp_path, *options)
    logs = sorted((tmp_path / "runs" / "spinal").glob("spinal_events*.jsonl"))
    run_ids = {record["run"] for log in logs for record in EventLog(log).read()}
    assert len(logs) == 2 and len(run_ids) == 1, "a resume supersedes records by their run id"


def test_hf_ddp_only_rank_zero_writes_tensorboard_one_event_file_per_run(
    hf_run: tuple[Path, list[dict[str, Any]]],
) -> None:
    out_dir, records = hf_run
    assert [r["had_board"] for r in records] == [True, False]
    spinal = out_dir / "runs" / "spinal"
    runs = [spinal, *(spinal / f"L{layer:02d}" for layer in range(4)), spinal / "reference"]
    assert sorted(path.parent for path in event_files(out_dir)) == sorted(runs)


def test_hf_ddp_tensorboard_holds_each_probe_step_once(
    hf_run: tuple[Path, list[dict[str, Any]]],
) -> None:
    out_dir, records = hf_run
    assert logged_steps(out_dir / "runs" / "spinal") == records[0]["probe_steps"]


def test_hf_ddp_an_alert_on_one_rank_stops_every_rank_at_the_same_step(
    tmp_path: Path,
) -> None:
    pytest.importorskip("trl")
    options = ("--max-steps", "12", "--poison-rank", "1", "--poison-step", "4")
    records = torchrun("trl_ddp_run.py", tmp_path, *options)
    assert [r["alerts"] for r in records] == [[], [[4, "non_finite"]]]
    assert [r["global_step"] for r in records] == [4, 4]
    assert [r["probe_steps"] for r in records] == [[0, 4], [0, 4]]
    assert (tmp_path / "checkpoint-4").is_dir()


def test_hf_ddp_an_alert_on_rank_one_only_rewinds_every_rank_at_the_same_step(
    tmp_path: Path,
) -> None:
    pytest.importorskip("trl")
    options = ("--max-steps", "12", "--poison-rank", "1", "--poison-step", "4", "--recover")
    records = torchrun("trl_ddp_run.py", tmp_path, *options)
    assert [r["alerts"] for r in records] == [[], [[4, "non_finite"]]]
    assert [r["recoveries"] for r in records] == [[[4, 0, 1]]] * WORLD_SIZE
    assert [r["global_step"] for r in records] == [12, 12]
    assert [r["probe_steps"] for r in records] == [[0, 4, 8, 12]] * WORLD_SIZE
    weights = [r["weights"] for r in records]
    assert weights[0] == weights[1] and all(math.isfinite(w) for w in weights[0])
    assert records[0]["learning_rate"] == records[1]["learning_rate"]


# --- Lightning strategy="ddp" ----------------------------------------------------------------


@pytest.fixture(scope="module")
def lightning_ddp(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    pytest.importorskip("lightning")
    out_dir = tmp_path_factory.mktemp("lightning_ddp")
    return out_dir, lightning_run(out_dir, "--max-steps", "8")


def test_lightning_ddp_every_rank_probes_the_same_probe_at_the_same_steps(
    lightning_ddp: tuple[Path, list[dict[str, Any]]],
) -> None:
    _, records = lightning_ddp
    assert [r["world_size"] for r in records] == [WORLD_SIZE] * WORLD_SIZE
    assert [r["global_step"] for r in records] == [8] * WORLD_SIZE
    assert [r["probe_steps"] for r in records] == [[0, 4, 8]] * WORLD_SIZE
    assert records[0]["transport_mean"] == records[1]["transport_mean"]


def test_lightning_ddp_only_global_rank_zero_writes_through_the_loggers_writer(
    lightning_ddp: tuple[Path, list[dict[str, Any]]],
) -> None:
    out_dir, records = lightning_ddp
    assert [r["had_board"] for r in records] == [True, False]
    log_dir = Path(records[0]["logger_log_dir"])
    assert records[0]["board_log_dir"] == str(log_dir) == str(out_dir / "tb" / "version_0")
    runs = [log_dir, *(log_dir / f"L{layer:02d}" for layer in range(4)), log_dir / "reference"]
    assert sorted(path.parent for path in event_files(out_dir)) == sorted(runs)


def test_lightning_ddp_tensorboard_holds_each_probe_step_once(
    lightning_ddp: tuple[Path, list[dict[str, Any]]],
) -> None:
    out_dir, records = lightning_ddp
    log_dir = out_dir / "tb" / "version_0"
    assert logged_steps(log_dir) == records[0]["probe_steps"]
    assert logged_steps(log_dir, "train/loss")


def test_lightning_ddp_probing_switched_off_on_one_rank_keeps_the_collectives_matched(
    tmp_path: Path,
) -> None:
    pytest.importorskip("lightning")
    options = ("--max-steps", "10", "--fail-rank", "1", "--collective-timeout", "20")
    records = lightning_run(tmp_path, *options)
    assert [r["disabled"] for r in records] == [False, True]
    assert [r["probe_steps"] for r in records] == [[0, 4, 8, 10], [0]]
    assert [r["global_step"] for r in records] == [10, 10]


# --- FSDP: fully_shard (FSDP2) and FSDP v1 ---------------------------------------------------


def fsdp_unavailable(wrapper: str) -> str | None:
    """Why ``wrapper`` cannot run on this torch over gloo, or None."""
    try:
        if wrapper == "fully_shard":
            from torch.distributed.fsdp import fully_shard  # noqa: F401
        else:
            from torch.distributed.fsdp import FullyShardedDataParallel  # noqa: F401
    except ImportError as error:
        return f"torch {torch.__version__} has no {wrapper}: {error}"
    return None


@pytest.fixture(scope="module", params=["fully_shard", "fsdp1"])
def fsdp_run(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> list[dict[str, Any]]:
    reason = fsdp_unavailable(request.param)
    if reason is not None:
        pytest.skip(reason)
    out_dir = tmp_path_factory.mktemp(f"fsdp_{request.param}")
    return torchrun("fsdp_probe_run.py", out_dir, "--wrapper", request.param)


def assert_trace_matches(trace: dict[str, Any], reference: dict[str, Any]) -> None:
    assert trace["layers"] == reference["layers"]
    for key in ("contraction", "transport"):
        assert trace[key] == pytest.approx(reference[key], abs=1e-5), key
    for name, value in reference["summary"].items():
        assert trace["summary"][name] == pytest.approx(value, abs=1e-5), name


def test_fsdp_probe_gathers_the_shards_and_matches_the_unsharded_model_on_every_rank(
    fsdp_run: list[dict[str, Any]],
) -> None:
    reference = fsdp_run[0]["reference"]
    assert [r["sharded_units"] for r in fsdp_run] == [5] * WORLD_SIZE  # 4 blocks and the root
    if fsdp_run[0]["wrapper"] == "fully_shard":
        assert [r["block_parameters_sharded"] for r in fsdp_run] == [True] * WORLD_SIZE
    for record in fsdp_run:
        for trace in [*record["warm_traces"], record["cold_traces"][0]]:
            assert_trace_matches(trace, reference)
    first, second = fsdp_run
    assert first["warm_traces"] == second["warm_traces"]
    assert first["cold_traces"][0] == second["cold_traces"][0]


def test_fsdp_model_trains_after_a_probe_that_ran_before_its_first_forward(
    fsdp_run: list[dict[str, Any]],
) -> None:
    assert [r["train_after_cold_probe_error"] for r in fsdp_run] == [None] * WORLD_SIZE
    for record in fsdp_run:
        assert_trace_matches(record["cold_traces"][1], fsdp_run[0]["reference"])
