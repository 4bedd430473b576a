"""The probe under sharding engines, for real: two CPU processes over gloo.

Lightning's ``FSDPStrategy`` (FSDP v1 wrapping the ``LightningModule``, through a CPU subclass)
and ``ModelParallelStrategy`` (``fully_shard`` in ``configure_model``), TRL's ``DPOTrainer`` under
accelerate's FSDP2 (through a CPU patch), and the Lightning strategies again under two torchrun
agents as two simulated nodes. Every launch also trains under DDP, same seed and data, so each
engine's probe values are compared on every rank with the unsharded model (at step 0, and with
the final weights gathered) and with DDP at every probe. After every probe the engine must be as
a training step left it: no unit holding gathered parameters, none in a forward left half done.
The drift is measured at every probe too. A model wrapped directly (FSDP v1 around the LM, as
accelerate wraps it, and ``fully_shard``) is left as the probe found it, probed before and after
its first training step. A probe failing on one rank switches probing off on every rank, with
no collective left unmatched. Each launch has a timeout; a hang fails the test and leaves no
process behind.

Single-process checks come first: ``spinal_callback.probe.sharding`` on an unsharded model, and the
runner's agreement between ranks for a sharded model (the other ranks simulated).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from test_distributed import (
    LAUNCHER_VARIABLES,
    REPO,
    SCRIPTS,
    WORLD_SIZE,
    free_port,
    kill_process_tree,
    rank_records,
    tail,
    torchrun,
)

from spinal_callback.config import SpinalConfig
from spinal_callback.demos.tiny import DEFAULT_PROBE_TEXTS, build_tiny_model
from spinal_callback.outputs.sinks import Outputs
from spinal_callback.probe.sharding import attach_root, root_parameters_whole, sharding_root
from spinal_callback.training.runner import Runner

LAUNCH_TIMEOUT_S = 240
TOLERANCE = 1e-5
LIGHTNING_STRATEGIES = ("fsdp", "model_parallel")

# --- single process ----------------------------------------------------------------------------


def test_an_unsharded_model_has_no_sharding_root_and_the_context_is_a_no_op() -> None:
    model = build_tiny_model("llama", vocab_size=64, layers=2)
    assert sharding_root(model) is None
    with root_parameters_whole(model):
        assert model.model.embed_tokens.weight.dim() == 2


def test_attach_root_ignores_a_root_that_shards_nothing() -> None:
    model = build_tiny_model("llama", vocab_size=64, layers=2)
    attach_root(model, torch.nn.Sequential(model))
    assert sharding_root(model) is None
    assert "_spinal_sharding_root" not in model.__dict__


def trace_record(contraction: list[float], neutral_nll: float | None = None) -> dict[str, Any]:
    """A trace record as the launch scripts write it, with ``contraction`` as its numbers."""
    return {
        "contraction": contraction,
        "transport": [],
        "summary": {},
        "neutral_nll": neutral_nll,
    }


def test_max_difference_is_the_largest_gap_between_finite_values_with_nan_where_both_are() -> None:
    nan = float("nan")
    trace = trace_record([1.0, nan, 3.0], neutral_nll=2.0)
    other = trace_record([1.5, nan, 2.0], neutral_nll=2.25)
    assert max_difference(trace, other) == 1.0


@pytest.mark.parametrize(
    ("contraction", "other"),
    [
        ([float("nan"), 1.0], [0.0, 1.0]),
        ([0.0, 1.0], [0.0, float("nan")]),
        ([float("inf"), 1.0], [float("-inf"), 1.0]),
    ],
)
def test_max_difference_fails_when_the_traces_disagree_on_non_finite_values(
    contraction: list[float], other: list[float]
) -> None:
    with pytest.raises(pytest.fail.Exception, match="disagree on non-finite values"):
        max_difference(trace_record(contraction), trace_record(other))


def test_max_difference_fails_when_no_value_is_finite_on_both_sides() -> None:
    nan = float("nan")
    with pytest.raises(pytest.fail.Exception, match="no finite value"):
        max_difference(trace_record([nan, nan]), trace_record([nan, nan]))


class OtherRanks:
    """``reduce_any`` as seen from one rank: ``answers`` are the other ranks' flags, one per
    call, in order (none left: the other ranks say no)."""

    def __init__(self) -> None:
        self.answers: list[bool] = []
        self.calls = 0

    def __call__(self, flag: bool) -> bool:
        self.calls += 1
        return flag or (self.answers.pop(0) if self.answers else False)


@pytest.fixture
def sharded_runner(
    tokenizer: Any, llama: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> tuple[Runner, OtherRanks]:
    """A runner whose model counts as sharded, probing every 2 steps, never stopping."""
    monkeypatch.setattr("spinal_callback.training.guarded_probe.sharding_root", lambda model: model)
    others = OtherRanks()
    runner = Runner(SpinalConfig(every_n_steps=2, stop_on=None), list(DEFAULT_PROBE_TEXTS))
    runner.setup(llama, tokenizer)
    runner.begin(0, Outputs(), tmp_path, others)
    return runner, others


def test_a_sharded_probe_is_skipped_on_every_rank_once_one_rank_switched_probing_off(
    sharded_runner: tuple[Runner, OtherRanks],
) -> None:
    runner, others = sharded_runner
    others.answers = [True]
    runner.step(2)
    runner.step(4)
    assert runner.disabled
    assert [trace.step for trace in runner.traces] == [0]


def test_a_sharded_probe_that_failed_on_another_rank_is_given_up_here_too(
    sharded_runner: tuple[Runner, OtherRanks],
) -> None:
    runner, others = sharded_runner
    others.answers = [False, False, True]  # not off, no rank out of memory, one rank failed
    runner.step(2)
    assert runner.disabled
    assert [trace.step for trace in runner.traces] == [0]
    assert "failed on another rank" in runner.alerts[-1].message


def test_an_unsharded_probe_asks_no_other_rank(tokenizer: Any, llama: Any, tmp_path: Path) -> None:
    others = OtherRanks()
    runner = Runner(SpinalConfig(every_n_steps=2, stop_on=None), list(DEFAULT_PROBE_TEXTS))
    runner.setup(llama, tokenizer)
    runner.begin(0, Outputs(), tmp_path, others)
    runner.step(2)
    assert others.calls == 0
    assert [trace.step for trace in runner.traces] == [0, 2]


# --- two processes -----------------------------------------------------------------------------

pytestmark_distributed = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="this torch build has no torch.distributed gloo backend",
)


def launch(script: str, out_dir: Path, *options: str) -> list[dict[str, Any]]:
    return torchrun(script, out_dir, *options, timeout=LAUNCH_TIMEOUT_S)


def agent_environment(port: int) -> dict[str, str]:
    """``run_processes``'s environment, for launches it cannot make (two agents at once)."""
    environment = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    environment.update(
        PYTHONPATH=os.pathsep.join([str(REPO), environment.get("PYTHONPATH", "")]),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
    )
    return environment


def two_node_torchrun(script: str, out_dir: Path, *options: str) -> list[dict[str, Any]]:
    """Two torchrun agents, one process each, as node 0 and node 1 of a static rendezvous."""
    port = free_port()
    environment = agent_environment(port)
    agents = []
    for node in range(2):
        arguments = [
            "-m",
            "torch.distributed.run",
            "--nnodes=2",
            f"--node_rank={node}",
            "--nproc_per_node=1",
            "--master_addr=127.0.0.1",
            f"--master_port={port}",
            str(SCRIPTS / script),
            str(out_dir),
            *options,
        ]
        log = out_dir / f"node{node}.log"
        with log.open("w") as output:
            agents.append(
                subprocess.Popen(
                    [sys.executable, *arguments],
                    cwd=REPO,
                    env=environment,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
    try:
        for node, agent in enumerate(agents):
            try:
                agent.wait(timeout=LAUNCH_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pytest.fail(
                    f"node {node} did not finish within {LAUNCH_TIMEOUT_S} s:\n"
                    f"{tail(out_dir / f'node{node}.log')}"
                )
    finally:
        for agent in agents:
            kill_process_tree(agent.pid)
            agent.wait()
    for node, agent in enumerate(agents):
        if agent.returncode != 0:
            pytest.fail(
                f"node {node} exited with {agent.returncode}:\n{tail(out_dir / f'node{node}.log')}"
            )
    return rank_records(out_dir)


@pytest.fixture(scope="module")
def lightning_runs(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    pytest.importorskip("lightning")
    out_dir = tmp_path_factory.mktemp("lightning_sharded")
    strategies = ",".join(("ddp", *LIGHTNING_STRATEGIES))
    return launch("lightning_sharded_run.py", out_dir, "--strategies", strategies)


@pytest.fixture(scope="module")
def hf_runs(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    pytest.importorskip("trl")
    out_dir = tmp_path_factory.mktemp("hf_fsdp2")
    return launch("fsdp_hf_run.py", out_dir, "--engines", "ddp,fsdp2")


@pytest.fixture(scope="module")
def two_node_runs(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    pytest.importorskip("lightning")
    out_dir = tmp_path_factory.mktemp("two_nodes")
    strategies = ",".join(("ddp", *LIGHTNING_STRATEGIES))
    return two_node_torchrun(
        "lightning_sharded_run.py", out_dir, "--strategies", strategies, "--num-nodes", "2"
    )


@pytest.fixture(scope="module")
def one_rank_failing(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    pytest.importorskip("lightning")
    out_dir = tmp_path_factory.mktemp("sharded_failure")
    strategies = ",".join(LIGHTNING_STRATEGIES)
    options = ("--strategies", strategies, "--fail-rank", "1", "--fail-from-step", "2")
    return launch("lightning_sharded_run.py", out_dir, *options)


@pytest.fixture(scope="module")
def direct_runs(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return launch("fsdp_direct_run.py", tmp_path_factory.mktemp("fsdp_direct"))


SHARDED_RUNS = [
    ("lightning_runs", "fsdp"),
    ("lightning_runs", "model_parallel"),
    ("hf_runs", "fsdp2"),
    ("two_node_runs", "fsdp"),
    ("two_node_runs", "model_parallel"),
]
SHARDED_IDS = [f"{launch.removesuffix('_runs')}-{engine}" for launch, engine in SHARDED_RUNS]


@pytest.fixture(params=SHARDED_RUNS, ids=SHARDED_IDS)
def sharded(request: pytest.FixtureRequest) -> tuple[list[dict[str, Any]], str]:
    launch, engine = request.param
    return request.getfixturevalue(launch), engine


def values(trace: dict[str, Any]) -> list[float]:
    """Every number of a trace record, in a fixed order."""
    summary = [trace["summary"][name] for name in sorted(trace["summary"])]
    neutral = [] if trace["neutral_nll"] is None else [trace["neutral_nll"]]
    return [*trace["contraction"], *trace["transport"], *summary, *neutral]


def max_difference(trace: dict[str, Any], other: dict[str, Any]) -> float:
    """The largest absolute difference between the two traces' finite numbers. Fails the test
    when the traces disagree on which numbers are not finite (NaN, or an infinity of the same
    sign, on both sides is agreement) or share no finite number to compare."""
    pairs = list(zip(values(trace), values(other), strict=True))
    finite = [(a, b) for a, b in pairs if math.isfinite(a) and math.isfinite(b)]
    disagree = [
        (index, a, b)
        for index, (a, b) in enumerate(pairs)
        if not (math.isfinite(a) and math.isfinite(b))
        and not (a == b or (math.isnan(a) and math.isnan(b)))
    ]
    if disagree:
        pytest.fail(f"the traces disagree on non-finite values, (index, value, other): {disagree}")
    if not finite:
        pytest.fail(f"the traces share no finite value to compare: {pairs}")
    return max(abs(a - b) for a, b in finite)


@pytestmark_distributed
def test_lightning_fsdp_strategy_wraps_the_lightning_module_and_the_probe_stays_on(
    lightning_runs: list[dict[str, Any]],
) -> None:
    runs = [record["runs"]["fsdp"] for record in lightning_runs]
    assert [run["wrapped"] for run in runs] == ["FullyShardedDataParallel"] * WORLD_SIZE
    assert [run["disabled"] for run in runs] == [False] * WORLD_SIZE
    assert [run["alerts"] for run in runs] == [[]] * WORLD_SIZE


@pytestmark_distributed
def test_hf_fsdp2_shards_the_policy(hf_runs: list[dict[str, Any]]) -> None:
    runs = [record["runs"]["fsdp2"] for record in hf_runs]
    assert [run["sharded"] for run in runs] == [True] * WORLD_SIZE
    assert [run["wrapper"].startswith("FSDP") for run in runs] == [True] * WORLD_SIZE


@pytestmark_distributed
def test_sharded_probe_runs_at_every_probe_step_on_every_rank(
    sharded: tuple[list[dict[str, Any]], str],
) -> None:
    records, engine = sharded
    runs = [record["runs"][engine] for record in records]
    assert [record["world_size"] for record in records] == [WORLD_SIZE] * WORLD_SIZE
    assert [run["global_step"] for run in runs] == [4] * WORLD_SIZE
    assert [[t["step"] for t in run["traces"]] for run in runs] == [[0, 2, 4]] * WORLD_SIZE
    assert [run["disabled"] for run in runs] == [False] * WORLD_SIZE


@pytestmark_distributed
def test_sharded_drift_is_measured_at_every_probe_on_every_rank(
    sharded: tuple[list[dict[str, Any]], str],
) -> None:
    records, engine = sharded
    assert [r["runs"][engine]["drift_measurements"] for r in records] == [3] * WORLD_SIZE


@pytestmark_distributed
def test_sharded_probe_equals_the_unsharded_model_on_every_rank(
    sharded: tuple[list[dict[str, Any]], str],
) -> None:
    records, engine = sharded
    for record in records:
        run = record["runs"][engine]
        assert max_difference(run["traces"][0], run["unsharded_initial"]) <= TOLERANCE
        assert max_difference(run["traces"][-1], run["unsharded_final"]) <= TOLERANCE


@pytestmark_distributed
def test_sharded_probe_equals_ddp_at_every_probe_on_every_rank(
    sharded: tuple[list[dict[str, Any]], str],
) -> None:
    records, engine = sharded
    for record in records:
        traces, ddp = record["runs"][engine]["traces"], record["runs"]["ddp"]["traces"]
        assert len(traces) == len(ddp)
        for trace, reference in zip(traces, ddp):
            assert max_difference(trace, reference) <= TOLERANCE, trace["step"]


@pytestmark_distributed
def test_sharded_probe_leaves_nothing_gathered_and_no_forward_half_done(
    sharded: tuple[list[dict[str, Any]], str],
) -> None:
    records, engine = sharded
    for record in records:
        checks = record["runs"][engine]["after_probes"]
        assert [check["step"] for check in checks] == [0, 2, 4, 4]
        assert [c for c in checks if c["whole"] or c["busy"]] == []


@pytestmark_distributed
@pytest.mark.parametrize("engine", LIGHTNING_STRATEGIES)
def test_a_sharded_probe_failing_on_one_rank_switches_probing_off_on_every_rank_without_a_hang(
    one_rank_failing: list[dict[str, Any]], engine: str
) -> None:
    runs = [record["runs"][engine] for record in one_rank_failing]
    assert [run["global_step"] for run in runs] == [4] * WORLD_SIZE
    assert [run["disabled"] for run in runs] == [True] * WORLD_SIZE
    assert [[t["step"] for t in run["traces"]] for run in runs] == [[0]] * WORLD_SIZE
    assert [[a[:2] for a in run["alerts"]] for run in runs] == [[[2, "probe_failed"]]] * 2
    assert "failed on another rank" in runs[0]["alerts"][0][2]
    for run in runs:
        assert [c for c in run["after_probes"] if c["whole"] or c["busy"]] == []


@pytestmark_distributed
@pytest.mark.parametrize(
    "run", ["fsdp1-cold", "fsdp1-warm", "fully_shard-cold", "fully_shard-warm"]
)
def test_a_directly_wrapped_model_is_left_as_the_probe_found_it_and_trains_on(
    direct_runs: list[dict[str, Any]], run: str
) -> None:
    for record in direct_runs:
        result = record["runs"][run]
        assert max_difference(result["trace"], record["unsharded"]) <= TOLERANCE
        assert result["after_probe"] == {"whole": [], "busy": []}
        assert result["train_error"] is None
        assert result["after_training"] == {"whole": [], "busy": []}
