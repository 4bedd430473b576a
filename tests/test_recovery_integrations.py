"""Recovery inside TRL's ``DPOTrainer`` and a Lightning DPO module, end to end on CPU: a scripted
critical alert rewinds the real optimizer and scheduler, training reaches its last step, and a
run with recovery on and no alert ends bit-identical to one with recovery off."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import PreTrainedModel, PreTrainedTokenizerFast, TrainerCallback

from spinal_callback.integrations.transformers import SpinalTrainerCallback, training_state
from spinal_callback.outputs.event_log import EventLog
from tests.test_recovery import RECOVER, ScriptedMonitor

FIRE = {6: ("critical", "language_drift")}


def scripted(callback: Any, fire: dict[int, tuple[str, str]] | None = None) -> Any:
    callback.runner.use_monitor(ScriptedMonitor(callback.config, fire))
    return callback


class WeightsAt(TrainerCallback):  # type: ignore[misc]
    """The policy's weights after the update of each step, and before the update of each."""

    def __init__(self) -> None:
        self.after: dict[int, list[torch.Tensor]] = {}
        self.before: dict[int, list[torch.Tensor]] = {}

    def on_step_begin(
        self, args: Any, state: Any, control: Any, model: Any = None, **_: Any
    ) -> None:
        self.before[state.global_step + 1] = [p.detach().clone() for p in model.parameters()]

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **_: Any) -> None:
        self.after[state.global_step] = [p.detach().clone() for p in model.parameters()]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def scalar_steps(directory: Path, tag: str) -> list[tuple[int, float]]:
    events = EventAccumulator(str(directory), size_guidance={"scalars": 0})
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


# ---- TRL ----------------------------------------------------------------------------------


def test_trl_a_critical_alert_rewinds_the_run_which_then_trains_to_its_last_step(
    make_dpo_trainer: Callable[..., Any], probe_texts: list[str], tmp_path: Path
) -> None:
    spinal = scripted(
        SpinalTrainerCallback(probe_texts=probe_texts, every_n_steps=2, **RECOVER), FIRE
    )
    weights = WeightsAt()
    trainer = make_dpo_trainer(spinal, max_steps=12, extra_callbacks=[weights])
    trainer.train()
    assert trainer.state.global_step == 12 and not spinal.runner.stopped
    assert [(r.step, r.rewound_to) for r in spinal.runner.recoveries] == [(6, 2)]
    assert same(weights.before[7], weights.after[2]), "step 7 starts from step 2's weights"
    assert trainer.lr_scheduler.base_lrs == pytest.approx([5e-4] * 2), "two weight-decay groups"


def test_trl_the_recovery_is_in_the_event_log_and_charted_and_each_probe_step_is_shown_once(
    make_dpo_trainer: Callable[..., Any], probe_texts: list[str], tmp_path: Path
) -> None:
    spinal = scripted(
        SpinalTrainerCallback(probe_texts=probe_texts, every_n_steps=2, **RECOVER), FIRE
    )
    make_dpo_trainer(spinal, max_steps=10).train()
    spinal_dir = tmp_path / "run" / "runs" / "spinal"
    recorded = [r for r in EventLog(spinal_dir / "spinal_events.jsonl").read()]
    assert [r["step"] for r in recorded if r["rule"] == "recovered"] == [6]
    assert scalar_steps(spinal_dir, "spinal/recoveries") == [
        (0, 0.0),
        (2, 0.0),
        (4, 0.0),
        (6, 1.0),
        (8, 1.0),
        (10, 1.0),
    ], "a step function, one point per probe"
    probes = [step for step, _ in scalar_steps(spinal_dir, "spinal/alert_level_max")]
    assert probes == sorted(set(probes))


def test_trl_with_recovery_on_and_no_alert_the_weights_are_bit_identical_to_recovery_off(
    make_dpo_trainer: Callable[..., Any],
    make_model: Callable[..., PreTrainedModel],
    probe_texts: list[str],
    tmp_path: Path,
) -> None:
    finals = []
    for on_critical in ("stop", "recover"):
        torch.manual_seed(0)
        model = make_model("llama", layers=4)
        spinal = SpinalTrainerCallback(
            probe_texts=probe_texts, every_n_steps=2, stop_on="critical", on_critical=on_critical
        )
        trainer = make_dpo_trainer(
            spinal, max_steps=8, model=model, output_dir=tmp_path / on_critical
        )
        trainer.train()
        assert not spinal.runner.recoveries and not spinal.runner.stopped
        finals.append([p.detach().clone() for p in model.parameters()])
    assert same(*finals)


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "args",
    [
        SimpleNamespace(deepspeed="ds_config.json", fsdp=None),
        SimpleNamespace(deepspeed=None, fsdp=["full_shard"]),
    ],
)
def test_trl_recovery_under_deepspeed_or_fsdp_is_refused_at_train_begin(args: Any) -> None:
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="sharded across ranks"):
        training_state(args, model, torch.optim.SGD(model.parameters(), lr=0.1), None)


# ---- Lightning ----------------------------------------------------------------------------


pl = pytest.importorskip("lightning.pytorch")


def lightning_module(
    make_model: Callable[..., PreTrainedModel], tokenizer: PreTrainedTokenizerFast
) -> Any:
    from tests.test_integration_lightning import TinyDPOModule

    class Scheduled(TinyDPOModule):
        def configure_optimizers(self) -> Any:
            optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
            warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 4))
            return {
                "optimizer": optimizer,
                "lr_scheduler": {"scheduler": warmup, "interval": "step"},
            }

    return Scheduled(make_model("llama", layers=4), tokenizer)


class LightningWeights(pl.Callback):  # type: ignore[misc]
    def __init__(self) -> None:
        self.after: dict[int, list[torch.Tensor]] = {}
        self.before: dict[int, list[torch.Tensor]] = {}

    def on_train_batch_start(self, trainer: Any, module: Any, *args: Any) -> None:
        self.before[trainer.global_step + 1] = [p.detach().clone() for p in module.parameters()]

    def on_train_batch_end(self, trainer: Any, module: Any, *args: Any) -> None:
        self.after[trainer.global_step] = [p.detach().clone() for p in module.parameters()]


def test_lightning_a_critical_alert_rewinds_the_run_which_then_trains_to_its_last_step(
    make_model: Callable[..., PreTrainedModel],
    tokenizer: PreTrainedTokenizerFast,
    probe_texts: list[str],
    tmp_path: Path,
) -> None:
    from spinal_callback.integrations.lightning import SpinalCallback
    from tests.test_integration_lightning import make_trainer, pair_batches

    module = lightning_module(make_model, tokenizer)
    spinal = scripted(SpinalCallback(probe_texts=probe_texts, every_n_steps=2, **RECOVER), FIRE)
    weights = LightningWeights()
    trainer = make_trainer(tmp_path, [weights, spinal], max_steps=12)
    trainer.fit(module, pair_batches())
    assert trainer.global_step == 12 and not spinal.runner.stopped
    assert [(r.step, r.rewound_to) for r in spinal.runner.recoveries] == [(6, 2)]
    assert same(weights.before[7], weights.after[2]), "step 7 starts from step 2's weights"
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.base_lrs == [pytest.approx(5e-4)]
    assert not list(tmp_path.rglob("spinal-stop-*.ckpt")), "a recovery saves no stop checkpoint"


def test_lightning_with_recovery_on_and_no_alert_the_weights_are_bit_identical_to_recovery_off(
    make_model: Callable[..., PreTrainedModel],
    tokenizer: PreTrainedTokenizerFast,
    probe_texts: list[str],
    tmp_path: Path,
) -> None:
    from spinal_callback.integrations.lightning import SpinalCallback
    from tests.test_integration_lightning import make_trainer, pair_batches

    finals = []
    for on_critical in ("stop", "recover"):
        torch.manual_seed(0)
        module = lightning_module(make_model, tokenizer)
        spinal = SpinalCallback(
            probe_texts=probe_texts, every_n_steps=2, stop_on="critical", on_critical=on_critical
        )
        make_trainer(tmp_path / on_critical, [spinal], max_steps=8).fit(module, pair_batches())
        assert not spinal.runner.recoveries and not spinal.runner.stopped
        finals.append([p.detach().clone() for p in module.parameters()])
    assert same(*finals)


@pytest.mark.bad_input
def test_trl_recovery_without_the_trainers_optimizer_is_refused_at_train_begin() -> None:
    args = SimpleNamespace(deepspeed=None, fsdp=None)
    with pytest.raises(ValueError, match="got no optimizer"):
        training_state(args, torch.nn.Linear(2, 2), None, None)
