"""Recovery (``on_critical="recover"``): the snapshot of the training state, the learning-rate
factor that outlives the scheduler, and the runner's rewind, driven by a real training loop
whose alerts are scripted."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import PreTrainedModel

from spinal_callback.config import SpinalConfig
from spinal_callback.monitor.alerts import Alert
from spinal_callback.monitor.ramp_monitor import RampMonitor
from spinal_callback.outputs.event_log import EventLog
from spinal_callback.outputs.sinks import Outputs
from spinal_callback.training.recovery import (
    RECOVERED,
    Recovery,
    Snapshot,
    TrainingState,
    sharded_engine_reason,
)
from spinal_callback.training.runner import Decision, Runner

RECOVER = {"stop_on": "critical", "on_critical": "recover", "recover_lr_factor": 0.5}


class ScriptedMonitor(RampMonitor):
    """The real rules, plus an alert of ``rule`` at ``level`` at each probe step in ``fire``."""

    def __init__(
        self, config: SpinalConfig, fire: dict[int, tuple[str, str]] | None = None
    ) -> None:
        super().__init__(config)
        self.fire = dict(fire or {})

    def update(self, trace: Any) -> list[Alert]:
        alerts = super().update(trace)
        if trace.step in self.fire:
            level, rule = self.fire[trace.step]
            alerts.append(scripted_alert(trace.step, level, rule))
        return alerts


def scripted_alert(step: int, level: str = "critical", rule: str = "language_drift") -> Alert:
    return Alert(step, level, rule, "spinal/test", 1.0, 0.5, f"scripted {level} {rule}")


class TrainingLoop:
    """A real loop: AdamW under a warmup ``LambdaLR`` on a language-model loss of fixed batches;
    it runs the runner's events as an adapter does and keeps the weights after every step."""

    def __init__(
        self, runner: Runner, model: PreTrainedModel, directory: Path, log_every: int = 2
    ) -> None:
        self.runner, self.model, self.directory = runner, model, directory
        self.log_every = log_every
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: min(1.0, (step + 1) / 4)
        )
        generator = torch.Generator().manual_seed(0)
        self.batches = torch.randint(4, 200, (64, 4, 12), generator=generator)
        self.weights: dict[int, list[torch.Tensor]] = {}
        self.rates: dict[int, float] = {}

    def fit(self, max_steps: int) -> list[Decision]:
        self.runner.watch_training(TrainingState.of(self.model, [self.optimizer], [self.scheduler]))
        outputs = Outputs(event_log=EventLog(self.directory / "events.jsonl"))
        decisions = [self.runner.begin(0, outputs, self.directory)]
        self.keep(0)
        step = 0
        while step < max_steps and not decisions[-1].stop:
            step += 1
            self.train_step(step)
            self.keep(step)
            decisions.append(self.runner.step(step))
            if step % self.log_every == 0 and not decisions[-1].stop:
                decisions.append(self.runner.logs(step, {"loss": 0.69}))
        self.runner.end(step)
        return decisions

    def train_step(self, step: int) -> None:
        ids = self.batches[step % len(self.batches)]
        loss = self.model(input_ids=ids, labels=ids).loss
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def keep(self, step: int) -> None:
        self.weights[step] = [p.detach().clone() for p in self.model.parameters()]
        self.rates[step] = self.optimizer.param_groups[0]["lr"]


def scripted_runner(
    make_runner: Callable[..., Runner],
    model: PreTrainedModel,
    fire: dict[int, tuple[str, str]] | None = None,
    **fields: Any,
) -> Runner:
    runner = make_runner(model, **{**RECOVER, **fields})
    runner.use_monitor(ScriptedMonitor(runner.config, fire))
    return runner


def same(a: Iterable[torch.Tensor], b: Iterable[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def records(directory: Path, rule: str) -> list[dict[str, Any]]:
    return [r for r in EventLog(directory / "events.jsonl").read() if r["rule"] == rule]


# ---- the snapshot ---------------------------------------------------------------------------


def trained_linear(steps: int = 3) -> tuple[torch.nn.Module, Any, Any, Any]:
    model = torch.nn.Linear(6, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(torch.ones(()))
    for _ in range(steps):
        advance(model, optimizer, scheduler)
    return model, optimizer, scheduler, scaler


def advance(model: torch.nn.Module, optimizer: Any, scheduler: Any) -> None:
    model(torch.ones(2, 6)).square().sum().backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def flat(state: Any) -> list[Any]:
    """Every leaf of a ``state_dict`` tree, tensors as lists, in order."""
    if isinstance(state, torch.Tensor):
        return [state.tolist()]
    if isinstance(state, dict):
        return [x for key in sorted(state, key=str) for x in [key, *flat(state[key])]]
    if isinstance(state, (list, tuple)):
        return [x for item in state for x in flat(item)]
    return [state]


def test_a_snapshot_restores_weights_optimizer_scheduler_and_scaler_exactly() -> None:
    model, optimizer, scheduler, scaler = trained_linear()
    training = TrainingState.of(model, [optimizer], [scheduler], [scaler])
    expected = (
        [p.detach().clone() for p in model.parameters()],
        flat(optimizer.state_dict()),
        flat(scheduler.state_dict()),
        scaler.state_dict(),
    )
    snapshot = Snapshot.take(training, step=3, lr_scale=1.0, rules={})
    for _ in range(4):
        advance(model, optimizer, scheduler)
    scaler.update(new_scale=2.0)
    snapshot.restore(training, relative_scale=1.0)
    assert same(model.parameters(), expected[0])
    assert flat(optimizer.state_dict()) == expected[1]
    assert flat(scheduler.state_dict()) == expected[2]
    assert scaler.state_dict() == expected[3]


def test_taking_a_snapshot_changes_nothing_in_the_training_state() -> None:
    model, optimizer, scheduler, _ = trained_linear()
    twin = copy.deepcopy((model, optimizer, scheduler))
    Snapshot.take(TrainingState.of(model, [optimizer], [scheduler]), 3, 1.0, {})
    for _ in range(3):
        advance(model, optimizer, scheduler)
        advance(*twin)
    assert same(model.parameters(), twin[0].parameters())
    assert flat(optimizer.state_dict()) == flat(twin[1].state_dict())


def test_training_after_a_restore_never_writes_into_the_snapshot() -> None:
    model, optimizer, scheduler, _ = trained_linear()
    training = TrainingState.of(model, [optimizer], [scheduler])
    snapshot = Snapshot.take(training, 3, 1.0, {})
    kept = (copy.deepcopy(snapshot.parameters), flat(snapshot.optimizers))
    snapshot.restore(training, 1.0)
    for _ in range(3):
        advance(model, optimizer, scheduler)
    assert same(snapshot.parameters, kept[0]) and flat(snapshot.optimizers) == kept[1]


def test_a_new_snapshot_reuses_the_buffers_of_a_dropped_one() -> None:
    model, optimizer, scheduler, _ = trained_linear()
    training = TrainingState.of(model, [optimizer], [scheduler])
    first = Snapshot.take(training, 3, 1.0, {})
    buffers = [t.data_ptr() for t in first.parameters]
    advance(model, optimizer, scheduler)
    second = Snapshot.take(training, 4, 1.0, {}, reuse=first)
    assert [t.data_ptr() for t in second.parameters] == buffers
    assert same(second.parameters, model.parameters())


def assert_keeps_the_factor(
    make: Callable[[], tuple[torch.nn.Module, Any, Any]], factor: float, steps: int
) -> Any:
    """Restore a snapshot of a fresh ``make()`` with ``factor``, then step it beside an untouched
    twin: every rate is ``factor`` times the twin's. Returns the restored scheduler."""
    model, optimizer, scheduler = make()
    untouched = make()
    training = TrainingState.of(model, [optimizer], [scheduler])
    Snapshot.take(training, 0, 1.0, {}).restore(training, relative_scale=factor)
    for _ in range(steps):
        advance(model, optimizer, scheduler)
        advance(*untouched)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(
            factor * untouched[1].param_groups[0]["lr"], rel=1e-9
        )
    return scheduler


def test_the_learning_rate_factor_survives_a_lambda_schedule_that_recomputes_from_base_lrs() -> (
    None
):
    def trained() -> tuple[torch.nn.Module, Any, Any]:
        torch.manual_seed(0)
        return trained_linear()[:3]

    scheduler = assert_keeps_the_factor(trained, 0.5, steps=5)
    assert scheduler.base_lrs == [pytest.approx(0.05)]


def test_the_learning_rate_factor_survives_one_cycle_which_reads_max_lr_from_the_groups() -> None:
    def one_cycle() -> tuple[torch.nn.Module, Any, Any]:
        torch.manual_seed(0)
        model = torch.nn.Linear(6, 3)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        return model, optimizer, torch.optim.lr_scheduler.OneCycleLR(optimizer, 1.0, 20)

    assert_keeps_the_factor(one_cycle, 0.25, steps=8)


# ---- the runner's rewind ------------------------------------------------------------------


def test_a_critical_alert_rewinds_to_the_last_vouched_state_and_training_goes_on(
    llama: PreTrainedModel, make_runner: Callable[..., Runner], tmp_path: Path
) -> None:
    runner = scripted_runner(make_runner, llama, {6: ("critical", "language_drift")})
    loop = TrainingLoop(runner, llama, tmp_path)
    decisions = loop.fit(max_steps=10)
    assert [d.recovered for d in decisions].count(True) == 1 and not runner.stopped
    # Probe 2 was quiet, and probe 4 quiet too vouched for it; probe 4's own state is not yet
    # vouched for when probe 6 alerts.
    (report,) = runner.recoveries
    assert (report.step, report.rewound_to, report.steps_lost, report.attempt) == (6, 2, 4, 1)
    assert report.learning_rate == pytest.approx(0.5 * loop.rates[2])
    assert [trace.step for trace in runner.traces] == [0, 2, 4, 6, 8, 10]


def test_after_the_rewind_the_weights_are_the_good_states_and_the_rate_is_halved(
    llama: PreTrainedModel, make_runner: Callable[..., Runner], tmp_path: Path
) -> None:
    runner = scripted_runner(make_runner, llama, {6: ("critical", "language_drift")})
    loop = TrainingLoop(runner, llama, tmp_path)
    loop.fit(max_steps=6)
    assert same(llama.parameters(), loop.weights[2])
    assert loop.optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * loop.rates[2])
    assert loop.scheduler.last_epoch == 2 and loop.scheduler.base_lrs == [pytest.approx(5e-4)]


def test_the_recovered_record_states_the_rewind_in_the_event_log(
    llama: PreTrainedModel, make_runner: Callable[..., Runner], tmp_path: Path
) -> None:
    runner = scripted_runner(make_runner, llama, {6: ("critical", "language_drift")})
    TrainingLoop(runner, llama, tmp_path).fit(max_steps=8)
    (record,) = records(tmp_path, RECOVERED)
    assert record["step"] == 6 and record["metric"] == "spinal/recoveries"
    details = record["details"]
    assert (details["rewound_to"], details["steps_lost"], details["attempt"]) == (2, 4, 1)
    assert details["cause"] == "critical language_drift"
    assert details["learning_rate"] == pytest.approx(5e-4 * 0.75)
    assert "rewound to the good state of step 2" in record["message"]


def test_a_warning_drops_the_newest_snapshot_so_the_rewind_goes_further_back(
    llama: PreTrainedModel, make_runner: Callable[..., Runner], tmp_path: Path
) -> None:
    fire = {4: ("warning", "trace_departure"), 6: ("critical", "language_drift")}
    runner = scripted_runner(make_runner, llama, fire)
    TrainingLoop(runner, llama, tmp_path).fit(max_steps=6)
    assert [(r.step, r.rewound_to) for r in runner.recoveries] == [(6, 0)]


def test_the_rules_are_rewound_and_the_reference_stays(
    llama: PreTrainedModel, make_runner: Callable[..., Runner], tmp_path: Path
) -> None:
    runner = scripted_runner(make_runner, llama, {6: ("critical", "language_drift")})
    loop = TrainingLoop(runner, llama, tmp_path)
    seen: list[tuple[int, Any]] = []
    original = runner.monitor.load_state_dict

    def load(state: Any) -> None:
        seen.append((int(state["probes_seen"]), runner.reference))
        original(state)

    runner.monitor.load_state_dict = load  # type: ignore[method-assign]
    loop.fit(max_steps=6)
    (probes_seen, reference_then), *_ = seen
    assert len(seen) == 1 and probes_seen == 2, "the rules as they were after probes 0 and 2"
    assert runner.reference is reference_then and runner.reference.step == 0


def test_each_recovery_multiplies_the_rate_again_and_the_last_one_stops_saying_why(
    llama: PreTrainedModel, make_runner: Callable[..., Runner], tmp_path: Path
) -> None:
    fire = {step: ("critical", "language_drift") for step in (4, 8, 12)}
    runner = scripted_runner(make_runner, llama, fire, max_recoveries=2, recover_lr_factor=0.3)
    decisions = TrainingLoop(runner, llama, tmp_path).fit(max_steps=20)
    assert [r.lr_scale for r in runner.recoveries] == pytest.approx([0.3, 0.09])
    assert decisions[-1].stop and runner.stopped
    assert "It was not recovered: the 2 recoveries allowed are used up" in decisions[-1].message


@pytest.mark.parametrize(
    ("rule", "why"),
    [("preference_reversal", "a fault of the data"), ("loss_spike", "check the data first")],
)
def test_a_rule_a_gentler_step_cannot_fix_stops_without_a_rewind(
    llama: PreTrainedModel,
    make_runner: Callable[..., Runner],
    tmp_path: Path,
    rule: str,
    why: str,
) -> None:
    runner = scripted_runner(make_runner, llama, {4: ("critical", rule)})
    decisions = TrainingLoop(runner, llama, tmp_path).fit(max_steps=10)
    assert decisions[-1].stop and not runner.recoveries
    assert (
        f"It was not recovered: {rule}: " in decisions[-1].message and why in decisions[-1].message
    )


def test_with_no_good_state_yet_the_alert_stops_the_run(
    llama: PreTrainedModel, make_runner: Callable[..., Runner], tmp_path: Path
) -> None:
    fire = {0: ("critical", "language_drift")}
    runner = scripted_runner(make_runner, llama, fire)
    decisions = TrainingLoop(runner, llama, tmp_path).fit(max_steps=4)
    assert decisions[0].stop and "no good state was kept yet" in decisions[0].message


def test_the_logs_of_the_dropped_steps_are_not_scored(
    llama: PreTrainedModel, make_runner: Callable[..., Runner], tmp_path: Path
) -> None:
    runner = scripted_runner(make_runner, llama, {6: ("critical", "language_drift")})
    TrainingLoop(runner, llama, tmp_path).fit(max_steps=6)
    before = len(runner.alerts)
    assert runner.logs(6, {"loss": math.nan}) == Decision()
    assert len(runner.alerts) == before
    runner.logs(8, {"loss": math.nan})
    assert [alert.rule for alert in runner.alerts[before:]] == ["non_finite"]


def test_the_first_log_after_a_recovery_averages_dropped_steps_and_is_not_scored(
    llama: PreTrainedModel, make_runner: Callable[..., Runner], tmp_path: Path
) -> None:
    runner = scripted_runner(make_runner, llama, {6: ("critical", "language_drift")})
    TrainingLoop(runner, llama, tmp_path, log_every=4).fit(max_steps=6)
    before = len(runner.alerts)
    assert runner.logs(8, {"loss": math.nan}) == Decision(), "steps 5-8: 5 and 6 were dropped"
    runner.logs(12, {"loss": math.nan})
    assert [alert.rule for alert in runner.alerts[before:]] == ["non_finite"]


def test_a_recovery_is_not_replaced_by_a_good_checkpoint_rotation(
    llama: PreTrainedModel, tokenizer: Any, probe_texts: list[str], tmp_path: Path
) -> None:
    runner = Runner(
        SpinalConfig(every_n_steps=2, **RECOVER), probe_texts, keep_good_checkpoint=True
    )
    runner.setup(llama, tokenizer)
    runner.use_monitor(ScriptedMonitor(runner.config, {6: ("critical", "language_drift")}))
    decisions = TrainingLoop(runner, llama, tmp_path).fit(max_steps=10)
    steps = [d for d in decisions if d.recovered or d.save_good]
    assert [(d.recovered, d.save_good) for d in steps] == [(False, True)] * 2 + [(True, False)]


@pytest.mark.bad_input
def test_a_refusal_on_another_rank_refuses_on_this_one_too(
    llama: PreTrainedModel, tokenizer: Any, probe_texts: list[str]
) -> None:
    runner = Runner(SpinalConfig(**RECOVER), probe_texts, reduce_any=lambda flag: True)
    runner.setup(llama, tokenizer)
    optimizer = torch.optim.AdamW(llama.parameters())
    with pytest.raises(RuntimeError, match="refused on another rank"):
        runner.watch_training(TrainingState.of(llama, [optimizer]))


def test_the_factor_survives_a_sequential_warmup_then_cosine_schedule() -> None:
    def sequential() -> tuple[torch.nn.Module, Any, Any]:
        torch.manual_seed(0)
        model = torch.nn.Linear(6, 3)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
        warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: (s + 1) / 4)
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 10, eta_min=0.01)
        chain = torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, cosine], [3])
        return model, optimizer, chain

    assert_keeps_the_factor(sequential, 0.1, steps=12)


def test_with_recovery_on_and_no_alert_the_weights_are_bit_identical_to_recovery_off(
    make_model: Callable[..., PreTrainedModel], make_runner: Callable[..., Runner], tmp_path: Path
) -> None:
    finals = []
    for on_critical in ("stop", "recover"):
        torch.manual_seed(0)
        model = make_model("llama")
        runner = make_runner(model, stop_on="critical", on_critical=on_critical)
        loop = TrainingLoop(runner, model, tmp_path / on_critical)
        loop.fit(max_steps=9)
        assert not runner.recoveries and not runner.stopped
        finals.append((loop.weights[9], flat(loop.optimizer.state_dict())))
    assert same(finals[0][0], finals[1][0]) and finals[0][1] == finals[1][1]


def test_recovery_off_keeps_no_snapshot(
    llama: PreTrainedModel, make_runner: Callable[..., Runner], tmp_path: Path
) -> None:
    runner = make_runner(llama)
    TrainingLoop(runner, llama, tmp_path).fit(max_steps=4)
    assert runner.recovery is None and runner.recoveries == []


def test_attempts_and_the_factor_survive_a_resume(
    llama: PreTrainedModel, make_runner: Callable[..., Runner], tmp_path: Path
) -> None:
    runner = scripted_runner(make_runner, llama, {6: ("critical", "language_drift")})
    TrainingLoop(runner, llama, tmp_path).fit(max_steps=8)
    resumed = make_runner(llama, **RECOVER)
    resumed.load_state_dict(runner.state_dict())
    assert resumed.recovery is not None
    assert (resumed.recovery.attempts, resumed.recovery.lr_scale) == (1, 0.5)


# ---- refused early ------------------------------------------------------------------------


@pytest.mark.bad_input
def test_snapshots_too_large_for_host_memory_are_refused_before_the_first_step() -> None:
    model, optimizer, scheduler, _ = trained_linear()
    recovery = Recovery(SpinalConfig(**RECOVER), available_memory=lambda: 1000)
    with pytest.raises(MemoryError, match="on_critical='stop' with keep_good_checkpoint"):
        recovery.watch(TrainingState.of(model, [optimizer], [scheduler]))


@pytest.mark.bad_input
def test_a_model_with_nothing_trainable_is_refused() -> None:
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        TrainingState.of(frozen)


@pytest.mark.bad_input
@pytest.mark.parametrize("engine", ["FSDPStrategy", "DeepSpeedStrategy", "FSDP", "DeepSpeed"])
def test_sharded_engines_are_refused_with_a_one_line_reason(engine: str) -> None:
    reason = sharded_engine_reason([engine])
    assert reason is not None and "\n" not in reason and "keep_good_checkpoint" in reason
    assert sharded_engine_reason(["DDPStrategy", "SingleDeviceStrategy"]) is None


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"on_critical": "rewind"}, "on_critical must be one of"),
        ({"recover_lr_factor": 1.0}, r"recover_lr_factor must be in \(0, 1\)"),
        ({"recover_lr_factor": 0.0}, r"recover_lr_factor must be in \(0, 1\)"),
        ({"max_recoveries": 0}, "max_recoveries must be an int >= 1"),
        ({"on_critical": "recover", "stop_on": None}, "needs stop_on"),
    ],
)
def test_bad_recovery_settings_are_refused_in_the_config(
    fields: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        SpinalConfig(**fields)


def test_a_recovered_record_with_no_learning_rate_is_still_strict_json(tmp_path: Path) -> None:
    from spinal_callback.training.recovery import RecoveryReport

    report = RecoveryReport(8, 4, 1, math.nan, 0.1, "critical non_finite")
    log = EventLog(tmp_path / "events.jsonl")
    log.append(report.record(max_recoveries=3))
    (record,) = log.read()
    assert record["details"]["learning_rate"] is None and record["details"]["steps_lost"] == 4


def test_snapshots_in_a_directory_rewind_the_same_and_are_removed_at_train_end(
    llama: PreTrainedModel, make_runner: Callable[..., Runner], tmp_path: Path
) -> None:
    snapshots = tmp_path / "snapshots"
    fire = {6: ("critical", "language_drift")}
    runner = scripted_runner(make_runner, llama, fire, recover_snapshot_dir=str(snapshots))
    loop = TrainingLoop(runner, llama, tmp_path)
    seen: list[list[str]] = []
    original = runner.step

    def step(at: int) -> Decision:
        seen.append(sorted(path.name for path in snapshots.iterdir()))
        return original(at)

    runner.step = step  # type: ignore[method-assign]
    loop.fit(max_steps=6)
    assert same(llama.parameters(), loop.weights[2]) and runner.recoveries[0].rewound_to == 2
    run = runner.run_id
    assert seen[-1] == [
        f"spinal-recovery-{run}-good.rank0.pt",
        f"spinal-recovery-{run}-newest.rank0.pt",
    ]
    assert list(snapshots.iterdir()) == [], "removed at train end"


@pytest.mark.bad_input
def test_a_snapshot_directory_without_room_is_refused_before_the_first_step(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import shutil

    model, optimizer, scheduler, _ = trained_linear()
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10, 10, 10))
    config = SpinalConfig(**RECOVER, recover_snapshot_dir=str(tmp_path))
    with pytest.raises(OSError, match="point it at a larger disk"):
        Recovery(config).watch(TrainingState.of(model, [optimizer], [scheduler]))
