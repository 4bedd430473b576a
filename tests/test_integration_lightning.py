"""SpinalCallback inside a Lightning DPO-style LightningModule."""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from spinal_callback.integrations.lightning import SpinalCallback
from spinal_callback.outputs.event_log import EventLog
from spinal_callback.outputs.tensorboard import layer_scalars, trace_scalars

pl = pytest.importorskip("lightning.pytorch")


class TinyDPOModule(pl.LightningModule):
    """Policy `model`, frozen `reference`; sigmoid DPO loss on summed token log-probs."""

    def __init__(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, beta: float = 0.1
    ) -> None:
        super().__init__()
        self.model = model
        self.reference = copy.deepcopy(model).requires_grad_(False).eval()
        self.tokenizer = tokenizer
        self.beta = beta

    def _logps(self, model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
        logits = model(input_ids=ids).logits[:, :-1]
        return (
            torch.log_softmax(logits.float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1).sum(-1)
        )

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        with torch.no_grad():
            ref_c, ref_r = (
                self._logps(self.reference, batch["chosen"]),
                self._logps(self.reference, batch["rejected"]),
            )
        margin = (self._logps(self.model, batch["chosen"]) - ref_c) - (
            self._logps(self.model, batch["rejected"]) - ref_r
        )
        loss = -torch.nn.functional.logsigmoid(self.beta * margin).mean()
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.model.parameters(), lr=1e-3)


def pair_batches(count: int = 16) -> torch.utils.data.DataLoader:
    """Batches of 4 pairs: the chosen reply repeats the last prompt token, the rejected does not."""
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(4, 300, (count, 4, 6), generator=generator)
    batches = [
        {
            "chosen": torch.cat([p, p[:, -1:]], 1),
            "rejected": torch.cat([p, (p[:, -1:] + 1) % 300], 1),
        }
        for p in prompts
    ]
    return torch.utils.data.DataLoader(batches, batch_size=None)


@pytest.fixture
def module(
    make_model: Callable[..., PreTrainedModel], tokenizer: PreTrainedTokenizerFast
) -> TinyDPOModule:
    return TinyDPOModule(make_model("llama", layers=4), tokenizer)


def make_trainer(root: Path, callbacks: list[Any], max_steps: int = 12, **kwargs: Any) -> Any:
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": max_steps,
        "default_root_dir": str(root),
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "log_every_n_steps": 1,
        "logger": pl.loggers.TensorBoardLogger(str(root), name="tb", version=0),
    }
    options.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **options)


def events_in(directory: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(directory), size_guidance={"scalars": 0})
    accumulator.Reload()
    return accumulator


def test_probes_at_start_every_n_steps_and_end(
    module: TinyDPOModule, tmp_path: Path, probe_texts: list[str]
) -> None:
    callback = SpinalCallback(probe_texts=probe_texts, every_n_steps=5)
    make_trainer(tmp_path, [callback]).fit(module, pair_batches())
    assert [trace.step for trace in callback.traces] == [0, 5, 10, 12]


def test_writes_through_the_trainers_tensorboard_logger(
    module: TinyDPOModule, tmp_path: Path, probe_texts: list[str]
) -> None:
    callback = SpinalCallback(probe_texts=probe_texts, every_n_steps=4)
    trainer = make_trainer(tmp_path, [callback])
    trainer.fit(module, pair_batches())
    log_dir = Path(trainer.logger.log_dir)
    events = events_in(log_dir)
    assert "train/loss" in events.Tags()["scalars"]
    for trace in callback.traces:
        for tag, value in trace_scalars(trace).items():
            assert {e.step: e.value for e in events.Scalars(tag)}[trace.step] == pytest.approx(
                value, rel=1e-6
            )
        for run, scalars in layer_scalars(trace).items():
            block = events_in(log_dir / run)
            for tag, value in scalars.items():
                logged = {e.step: e.value for e in block.Scalars(tag)}
                assert logged[trace.step] == pytest.approx(value, rel=1e-6), (run, tag)


def test_reference_is_the_modules_frozen_reference(
    module: TinyDPOModule, tmp_path: Path, probe_texts: list[str]
) -> None:
    callback = SpinalCallback(probe_texts=probe_texts, every_n_steps=6)
    make_trainer(tmp_path, [callback]).fit(module, pair_batches())
    reference, final = callback.runner.reference, callback.traces[-1]
    assert reference is not None
    torch.testing.assert_close(reference.contraction, callback.traces[0].contraction)
    assert not torch.allclose(final.contraction, reference.contraction, atol=1e-5)


def test_without_tensorboard_logger_it_writes_its_own_and_feeds_other_loggers(
    module: TinyDPOModule, tmp_path: Path, probe_texts: list[str]
) -> None:
    callback = SpinalCallback(probe_texts=probe_texts, every_n_steps=4)
    csv = pl.loggers.CSVLogger(str(tmp_path), name="csv", version=0)
    make_trainer(tmp_path, [callback], logger=csv).fit(module, pair_batches())
    events = events_in(tmp_path / "spinal")
    assert [e.step for e in events.Scalars("spinal/ramp/tortuosity")] == [0, 4, 8, 12]
    header = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert "spinal/ramp/tortuosity" in header


def test_other_loggers_get_the_summaries_and_tensorboard_charts_each_once(
    module: TinyDPOModule, tmp_path: Path, probe_texts: list[str]
) -> None:
    callback = SpinalCallback(probe_texts=probe_texts, every_n_steps=4)
    tensorboard = pl.loggers.TensorBoardLogger(str(tmp_path), name="tb", version=0)
    csv = pl.loggers.CSVLogger(str(tmp_path), name="csv", version=0)
    make_trainer(tmp_path, [callback], max_steps=8, logger=[tensorboard, csv]).fit(
        module, pair_batches()
    )
    events = events_in(Path(tensorboard.log_dir))
    summaries = [tag for tag in events.Tags()["scalars"] if tag.startswith("spinal/ramp/")]
    assert summaries
    for tag in [*summaries, "spinal/alert_level"]:
        assert [e.step for e in events.Scalars(tag)] == [0, 4, 8], tag
    header = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert {*summaries, "spinal/alert_level"} <= set(header.split(","))


def test_resume_from_checkpoint_writes_no_duplicate_and_no_missing_steps(
    make_model: Callable[..., PreTrainedModel],
    tokenizer: PreTrainedTokenizerFast,
    tmp_path: Path,
    probe_texts: list[str],
) -> None:
    checkpoints = pl.callbacks.ModelCheckpoint(
        dirpath=str(tmp_path / "ckpt"), every_n_train_steps=6, save_top_k=-1
    )
    first = SpinalCallback(probe_texts=probe_texts, every_n_steps=4)
    make_trainer(tmp_path, [first, checkpoints]).fit(
        TinyDPOModule(make_model("llama", layers=4), tokenizer), pair_batches()
    )
    # TensorBoard reads event files in name order, and names carry the creation time in whole
    # seconds: a real resume is a later process, so keep the resumed writer's file later too.
    time.sleep(1.1)
    resumed = SpinalCallback(probe_texts=probe_texts, every_n_steps=4)
    trainer = make_trainer(tmp_path, [resumed])
    module = TinyDPOModule(make_model("llama", layers=4), tokenizer)
    trainer.fit(module, pair_batches(), ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=6.ckpt"))
    assert [trace.step for trace in resumed.traces] == [0, 4, 8, 12]
    logged = events_in(Path(trainer.logger.log_dir)).Scalars("spinal/ramp/transport_mean")
    assert [e.step for e in logged] == [0, 4, 8, 12]
    assert logged[-1].value == pytest.approx(resumed.traces[-1].summary["transport_mean"], rel=1e-6)


@pytest.mark.fault
def test_a_resumed_run_ends_in_the_state_of_an_uninterrupted_one(
    make_model: Callable[..., PreTrainedModel],
    tokenizer: PreTrainedTokenizerFast,
    tmp_path: Path,
    probe_texts: list[str],
) -> None:
    """The history, the reference and the schedule come back from the checkpoint (the rules'
    own state is checked by continuing both runs in tests/test_runner.py)."""
    checkpoints = pl.callbacks.ModelCheckpoint(
        dirpath=str(tmp_path / "ckpt"), every_n_train_steps=6, save_top_k=-1
    )
    whole = SpinalCallback(probe_texts=probe_texts, every_n_steps=2, stop_on=None)
    torch.manual_seed(0)
    model = make_model("llama", layers=4)
    make_trainer(tmp_path / "a", [whole, checkpoints]).fit(
        TinyDPOModule(copy.deepcopy(model), tokenizer), pair_batches()
    )
    resumed = SpinalCallback(probe_texts=probe_texts, every_n_steps=2, stop_on=None)
    make_trainer(tmp_path / "b", [resumed]).fit(
        TinyDPOModule(copy.deepcopy(model), tokenizer),
        pair_batches(),
        ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=6.ckpt"),
    )
    assert [t.step for t in resumed.traces] == [t.step for t in whole.traces]
    # Up to the checkpoint the history is the uninterrupted run's own, read back from its file.
    for ours, theirs in zip(resumed.traces[:4], whole.traces[:4]):
        assert ours.step == theirs.step
        torch.testing.assert_close(ours.contraction, theirs.contraction, rtol=0, atol=0)
    assert resumed.runner.probes_run == whole.runner.probes_run
    assert resumed.runner.reference is not None and whole.runner.reference is not None
    torch.testing.assert_close(
        resumed.runner.reference.contraction, whole.runner.reference.contraction, rtol=0, atol=0
    )


class CliDPOModule(TinyDPOModule):
    """A module ``LightningCLI`` can build from plain arguments."""

    def __init__(self, layers: int = 4) -> None:
        from spinal_callback.demos.tiny import build_tiny_model, build_tiny_tokenizer

        tokenizer = build_tiny_tokenizer()
        super().__init__(
            build_tiny_model("llama", vocab_size=len(tokenizer), layers=layers), tokenizer
        )

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return pair_batches(4)


def run_cli(tmp_path: Path, args: list[str]) -> Any:
    from lightning.pytorch.cli import LightningCLI

    base = [
        "fit",
        "--trainer.max_steps=4",
        "--trainer.accelerator=cpu",
        "--trainer.logger=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    return LightningCLI(CliDPOModule, args=[*base, *args], save_config_callback=None)


def test_lightning_cli_builds_the_callback_from_command_line_options(
    tmp_path: Path, probe_texts: list[str]
) -> None:
    pytest.importorskip("jsonargparse")
    cli = run_cli(
        tmp_path,
        [
            "--trainer.callbacks+=spinal_callback.integrations.lightning.SpinalCallback",
            "--trainer.callbacks.every_n_steps=2",
            "--trainer.callbacks.stop_on=warning",
            f"--trainer.callbacks.probe_texts={json.dumps(probe_texts)}",
        ],
    )
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, SpinalCallback)]
    assert (callback.config.every_n_steps, callback.config.stop_on) == (2, "warning")
    assert [trace.step for trace in callback.traces] == [0, 2, 4]


def test_lightning_cli_takes_the_automatic_cadence(tmp_path: Path, probe_texts: list[str]) -> None:
    pytest.importorskip("jsonargparse")
    cli = run_cli(
        tmp_path,
        [
            "--trainer.callbacks+=spinal_callback.integrations.lightning.SpinalCallback",
            "--trainer.callbacks.every_n_steps=auto",
            f"--trainer.callbacks.probe_texts={json.dumps(probe_texts)}",
        ],
    )
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, SpinalCallback)]
    assert callback.config.every_n_steps == "auto"
    assert callback.traces[0].step == 0


def test_lightning_cli_builds_the_callback_from_a_yaml_file(
    tmp_path: Path, probe_texts: list[str]
) -> None:
    pytest.importorskip("jsonargparse")
    config = tmp_path / "config.yaml"
    config.write_text(
        f"""
trainer:
  callbacks:
    - class_path: spinal_callback.integrations.lightning.SpinalCallback
      init_args:
        every_n_steps: 4
        stop_on: null
        late_layers: [1, 2, 3]
        probe_texts: {json.dumps(probe_texts)}
        config:
          transport: js
"""
    )
    cli = run_cli(tmp_path, [f"--config={config}"])
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, SpinalCallback)]
    assert callback.config.stop_on is None and callback.config.transport == "js"
    assert [trace.step for trace in callback.traces] == [0, 4]
    assert callback.traces[0].layers == [1, 2, 3]


def test_lightning_cli_reads_the_config_as_a_typed_spinal_config(
    tmp_path: Path, probe_texts: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("jsonargparse")
    config = tmp_path / "config.yaml"
    config.write_text(
        f"""
trainer:
  callbacks:
    - class_path: spinal_callback.integrations.lightning.SpinalCallback
      init_args:
        probe_texts: {json.dumps(probe_texts)}
        config:
          transport: earth_movers
"""
    )
    with pytest.raises(SystemExit):
        run_cli(tmp_path, [f"--config={config}"])
    error = capsys.readouterr().err
    assert "transport" in error and "earth_movers" in error and "hellinger" in error


def test_wrong_model_attribute_fails_at_setup_naming_the_submodules(
    module: TinyDPOModule, tmp_path: Path, probe_texts: list[str]
) -> None:
    trainer = make_trainer(tmp_path, [SpinalCallback(probe_texts=probe_texts, model_attr="policy")])
    with pytest.raises(
        ValueError, match=r"TinyDPOModule.policy is not a model.*'model', 'reference'"
    ):
        trainer.fit(module, pair_batches())
    assert trainer.global_step == 0


def test_missing_tokenizer_fails_at_setup(
    make_model: Callable[..., PreTrainedModel], tmp_path: Path, probe_texts: list[str]
) -> None:
    module = TinyDPOModule(make_model("llama", layers=4), tokenizer=None)  # type: ignore[arg-type]
    trainer = make_trainer(tmp_path, [SpinalCallback(probe_texts=probe_texts)])
    with pytest.raises(ValueError, match="needs a tokenizer"):
        trainer.fit(module, pair_batches())
    assert trainer.global_step == 0


def test_tokenizer_can_be_a_local_directory(
    module: TinyDPOModule,
    tokenizer: PreTrainedTokenizerFast,
    tmp_path: Path,
    probe_texts: list[str],
) -> None:
    tokenizer.save_pretrained(tmp_path / "tok")
    module.tokenizer = None  # type: ignore[assignment]
    callback = SpinalCallback(
        probe_texts=probe_texts, tokenizer=str(tmp_path / "tok"), every_n_steps=6
    )
    make_trainer(tmp_path, [callback], max_steps=6).fit(module, pair_batches())
    assert [trace.step for trace in callback.traces] == [0, 6]


def test_config_can_be_a_plain_dict_as_from_yaml(probe_texts: list[str]) -> None:
    callback = SpinalCallback(
        config={"every_n_steps": 7, "transport": "js"}, probe_texts=probe_texts
    )
    assert (callback.config.every_n_steps, callback.config.transport) == (7, "js")


class PoisonWeightsAt(pl.Callback):
    """Fault injection: overwrite one late MLP weight with inf after optimizer step `step`."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.model.model.layers[-1].mlp.down_proj.weight.fill_(float("inf"))


def test_critical_alert_saves_a_checkpoint_and_stops_training(
    module: TinyDPOModule, tmp_path: Path, probe_texts: list[str]
) -> None:
    alerts: list[Any] = []
    callback = SpinalCallback(probe_texts=probe_texts, every_n_steps=2, on_alert=alerts.append)
    trainer = make_trainer(tmp_path, [PoisonWeightsAt(4), callback], enable_checkpointing=False)
    trainer.fit(module, pair_batches())
    assert trainer.global_step == 4
    assert (tmp_path / "checkpoints" / "spinal-stop-step=4.ckpt").is_file()
    assert [(a.step, a.level, a.rule) for a in alerts] == [(4, "critical", "non_finite")]
    records = [
        json.loads(line) for line in (Path(trainer.logger.log_dir) / "spinal_events.jsonl").open()
    ]
    assert [(r["step"], r["rule"]) for r in records] == [
        (4, "non_finite"),
        (4, "training_stopped"),
        (4, "training_stopped"),
    ]
    stop_checkpoint = tmp_path / "checkpoints" / "spinal-stop-step=4.ckpt"
    assert f"the stop's checkpoint is {stop_checkpoint}" in records[-1]["message"]


class LossJumpsAt(TinyDPOModule):
    """Logs a ``train/loss`` near 0.5 that jumps to near 5.0 from optimizer step ``step`` on
    (``wobble=False``: exactly 0.5 then exactly 5.0, as an epoch-level metric would sit)."""

    def __init__(self, *args: Any, step: int, wobble: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.jump_step = step
        self.wobble = wobble

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        jumped = self.global_step + 1 >= self.jump_step
        wobble = 0.01 * (batch_idx % 3)
        self.log("train/loss", (5.0 if jumped else 0.5) + (wobble if self.wobble else 0.0))
        return loss


def test_a_sustained_loss_spike_in_the_logged_metrics_stops_training(
    make_model: Callable[..., PreTrainedModel],
    tokenizer: PreTrainedTokenizerFast,
    tmp_path: Path,
    probe_texts: list[str],
) -> None:
    module = LossJumpsAt(make_model("llama", layers=4), tokenizer, step=8)
    alerts: list[Any] = []
    callback = SpinalCallback(
        probe_texts=probe_texts, every_n_steps=100, loss_window=5, on_alert=alerts.append
    )
    trainer = make_trainer(tmp_path, [callback], max_steps=16, enable_checkpointing=False)
    trainer.fit(module, pair_batches())
    assert [(a.step, a.level, a.rule) for a in alerts] == [
        (8, "info", "loss_spike"),
        (9, "critical", "preference_reversal"),
        (9, "critical", "loss_spike"),
    ]
    assert trainer.global_step == 9
    assert (tmp_path / "checkpoints" / "spinal-stop-step=9.ckpt").is_file()


def test_a_metric_that_does_not_change_between_reads_is_not_scored_again(
    make_model: Callable[..., PreTrainedModel],
    tokenizer: PreTrainedTokenizerFast,
    tmp_path: Path,
    probe_texts: list[str],
) -> None:
    module = LossJumpsAt(make_model("llama", layers=4), tokenizer, step=8, wobble=False)
    alerts: list[Any] = []
    callback = SpinalCallback(
        probe_texts=probe_texts, every_n_steps=100, loss_window=3, on_alert=alerts.append
    )
    trainer = make_trainer(tmp_path, [callback], max_steps=12, enable_checkpointing=False)
    trainer.fit(module, pair_batches())
    assert trainer.global_step == 12
    assert not any(a.level == "critical" for a in alerts)


class PoisonWeightsAtStart(pl.Callback):
    """Fault injection: overwrite one late MLP weight with inf before the first step."""

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        with torch.no_grad():
            pl_module.model.model.layers[-1].mlp.down_proj.weight.fill_(float("inf"))


def test_a_critical_alert_at_the_step_zero_probe_stops_before_any_step(
    module: TinyDPOModule, tmp_path: Path, probe_texts: list[str]
) -> None:
    callback = SpinalCallback(probe_texts=probe_texts, every_n_steps=100)
    trainer = make_trainer(tmp_path, [PoisonWeightsAtStart(), callback], enable_checkpointing=False)
    trainer.fit(module, pair_batches())
    assert trainer.global_step == 0
    assert (tmp_path / "checkpoints" / "spinal-stop-step=0.ckpt").is_file()


def test_the_stop_names_the_last_model_checkpoint_saved_before_the_first_warning(
    module: TinyDPOModule,
    tmp_path: Path,
    probe_texts: list[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    checkpoints = pl.callbacks.ModelCheckpoint(
        dirpath=str(tmp_path / "ckpt"), every_n_train_steps=2, save_top_k=-1
    )
    callback = SpinalCallback(probe_texts=probe_texts, every_n_steps=2)
    trainer = make_trainer(tmp_path, [PoisonWeightsAt(5), callback, checkpoints])
    with caplog.at_level("ERROR", logger="spinal_callback"):
        trainer.fit(module, pair_batches())
    assert trainer.global_step == 6
    assert f"Resume from {tmp_path / 'ckpt' / 'epoch=0-step=4.ckpt'} (step 4)" in caplog.text


class KillAt(pl.Callback):
    """Fault injection: the process dies after optimizer step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("killed")


@pytest.mark.fault
def test_a_resume_with_a_versioned_logger_goes_on_in_the_new_version_and_leaves_the_old(
    make_model: Callable[..., PreTrainedModel],
    tokenizer: PreTrainedTokenizerFast,
    tmp_path: Path,
    probe_texts: list[str],
) -> None:
    def trainer_with(callbacks: list[Any]) -> Any:
        logger = pl.loggers.TensorBoardLogger(str(tmp_path), name="tb")  # versioned
        return make_trainer(tmp_path, callbacks, max_steps=20, logger=logger)

    saving = pl.callbacks.ModelCheckpoint(
        dirpath=str(tmp_path / "ckpt"), every_n_train_steps=10, save_top_k=-1
    )
    first = SpinalCallback(probe_texts=probe_texts, every_n_steps=2)
    with pytest.raises(RuntimeError, match="killed"):
        trainer_with([first, saving, KillAt(16)]).fit(
            TinyDPOModule(make_model("llama", layers=4), tokenizer), pair_batches()
        )
    old = tmp_path / "tb" / "version_0"
    old_files = {p.name: p.read_bytes() for p in old.iterdir() if p.name.startswith("spinal_")}
    assert old_files

    time.sleep(1.1)
    resumed = SpinalCallback(probe_texts=probe_texts, every_n_steps=2)
    trainer = trainer_with([resumed])
    trainer.fit(
        TinyDPOModule(make_model("llama", layers=4), tokenizer),
        pair_batches(),
        ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=10.ckpt"),
    )
    new = Path(trainer.logger.log_dir)
    assert new.name == "version_1"
    assert {p.name: p.read_bytes() for p in old.iterdir() if p.name in old_files} == old_files
    lines = [json.loads(line) for line in (new / "spinal_traces.jsonl").open()]
    assert [line["trace"]["step"] for line in lines] == list(range(0, 21, 2))
    records = EventLog(new / "spinal_events.jsonl").read()
    assert records[0]["rule"] == "resumed" and str(old) in records[0]["message"]
    logged = events_in(new).Scalars("spinal/ramp/transport_mean")
    assert [e.step for e in logged] == list(range(12, 21, 2))
