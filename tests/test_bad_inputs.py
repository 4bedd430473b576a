"""Every bad input a hostile user tried is refused before the first training step, with an error
that names what was wrong.

"Handled clearly" means: the exception is a ``TypeError``, ``ValueError`` (or one of their
subclasses) raised at construction or at train begin, never an ``AttributeError`` or a
``KeyError`` from deep inside, and its message names the offending argument. ``bench/robustness.py``
counts these cases (marker ``bad_input``) and the faults (marker ``fault``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from transformers import PreTrainedModel

from spinal_callback.integrations.transformers import SpinalTrainerCallback

pytestmark = pytest.mark.bad_input
SHARED_START = "The committee reviewed the proposal and asked for a clearer budget before the vote"
WORDS = ["today", "tomorrow", "again", "quietly", "slowly", "twice", "once", "later"]

CONSTRUCTION = [
    ("every_n_steps=0", {"every_n_steps": 0}, ValueError, "every_n_steps"),
    ("every_n_steps=-5", {"every_n_steps": -5}, ValueError, "every_n_steps"),
    ("every_n_steps=1.5", {"every_n_steps": 1.5}, TypeError, "every_n_steps"),
    ("every_n_steps='10'", {"every_n_steps": "ten"}, (TypeError, ValueError), "every_n_steps"),
    ("stop_on='fatal'", {"stop_on": "fatal"}, ValueError, "stop_on"),
    ("stop_on=3", {"stop_on": 3}, (TypeError, ValueError), "stop_on"),
    ("late_layers=[5]", {"late_layers": [5]}, ValueError, "late_layers"),
    ("late_layers=[]", {"late_layers": []}, ValueError, "late_layers"),
    ("late_layers='last'", {"late_layers": "last"}, (TypeError, ValueError), "late_layers"),
    ("max_probe_length=1", {"max_probe_length": 1}, ValueError, "max_probe_length"),
    ("max_probe_length=2", {"max_probe_length": 2}, ValueError, "max_probe_length"),
    ("max_probe_length=0", {"max_probe_length": 0}, ValueError, "max_probe_length"),
    ("transport='emd'", {"transport": "emd"}, ValueError, "transport"),
    ("spectrum_tokens=0", {"spectrum_tokens": 0}, ValueError, "spectrum_tokens"),
    ("transport_tokens=0", {"transport_tokens": 0}, ValueError, "transport_tokens"),
    ("transport_tolerance=0", {"transport_tolerance": 0.0}, ValueError, "transport_tolerance"),
    ("tail_low>tail_high", {"tail_low": 0.8, "tail_high": 0.5}, ValueError, "tail_low"),
    ("spectrum_dtype='half'", {"spectrum_dtype": "half"}, ValueError, "spectrum_dtype"),
    ("lens_dtype='int8'", {"lens_dtype": "int8"}, ValueError, "lens_dtype"),
    ("autocast_dtype='fp8'", {"autocast_dtype": "fp8"}, ValueError, "autocast_dtype"),
    ("seed=-1", {"seed": -1}, ValueError, "seed"),
    ("patience=0", {"patience": 0}, ValueError, "patience"),
    ("image_every=0", {"image_every": 0}, ValueError, "image_every"),
    ("lens_chunk_mib=0", {"lens_chunk_mib": 0}, ValueError, "lens_chunk_mib"),
    ("perplexity_warning=0.5", {"perplexity_warning": 0.5}, ValueError, "perplexity_warning"),
    (
        "perplexity_critical<warning",
        {"perplexity_warning": 2.0, "perplexity_critical": 1.5},
        ValueError,
        "perplexity_critical",
    ),
    ("departure_warning=-1", {"departure_warning": -1.0}, ValueError, "departure_warning"),
    ("reversal_margin=-0.1", {"reversal_margin": -0.1}, ValueError, "reversal_margin"),
    ("loss_window=1", {"loss_window": 1}, ValueError, "loss_window"),
    ("loss_spike_z=0", {"loss_spike_z": 0.0}, ValueError, "loss_spike_z"),
    ("drift_every=0", {"drift_every": 0}, ValueError, "drift_every"),
    ("event_log=5", {"event_log": 5}, TypeError, "event_log"),
    ("neutral_probe='yes'", {"neutral_probe": "maybe"}, (TypeError, ValueError), "neutral_probe"),
    ("unknown field", {"every_n_step": 5}, TypeError, "every_n_step"),
    ("config=42", {"config": 42}, TypeError, "config"),
    ("on_alert='http://hook'", {"on_alert": "http://hook"}, TypeError, "on_alert"),
    ("on_alert=3", {"on_alert": 3}, TypeError, "on_alert"),
    ("keep_good_checkpoint=5", {"keep_good_checkpoint": 5}, TypeError, "keep_good_checkpoint"),
    ("keep_good_checkpoint=''", {"keep_good_checkpoint": ""}, TypeError, "keep_good_checkpoint"),
    ("ref_model='/some/path'", {"ref_model": "/some/path"}, TypeError, "ref_model"),
    ("ref_model=dict", {"ref_model": {"weights": 1}}, TypeError, "ref_model"),
    ("probe_texts='one string'", {"probe_texts": "one string"}, TypeError, "probe_texts"),
    ("probe_texts=[]", {"probe_texts": []}, ValueError, "probe_texts"),
    ("probe_texts=[None]", {"probe_texts": ["a text", None]}, TypeError, "probe_texts"),
    ("probe_texts=['  ']", {"probe_texts": ["  "]}, ValueError, "probe_texts"),
    ("neutral_texts=[]", {"neutral_texts": []}, ValueError, "neutral_texts"),
]


@pytest.mark.parametrize(
    ("arguments", "error", "names"),
    [pytest.param(kw, err, name, id=case) for case, kw, err, name in CONSTRUCTION],
)
def test_a_bad_argument_is_refused_at_construction_naming_it(
    arguments: dict[str, Any], error: Any, names: str
) -> None:
    with pytest.raises(error, match=names):
        SpinalTrainerCallback(**arguments)


def test_a_good_checkpoint_naming_a_folder_of_the_users_is_refused_at_construction(
    tmp_path: Path,
) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="keep_good_checkpoint"):
        SpinalTrainerCallback(keep_good_checkpoint=str(tmp_path))


def shallower(policy: PreTrainedModel, make_model: Callable[..., Any]) -> Any:
    return make_model("llama", layers=2)


def wider_vocabulary(policy: PreTrainedModel, make_model: Callable[..., Any]) -> Any:
    reference = copy.deepcopy(policy)
    reference.resize_token_embeddings(policy.config.vocab_size + 64)
    return reference


def other_architecture(policy: PreTrainedModel, make_model: Callable[..., Any]) -> Any:
    return make_model("qwen2", layers=4)


@pytest.mark.parametrize("reference", [shallower, wider_vocabulary, other_architecture])
def test_a_reference_model_unlike_the_policy_is_refused_before_the_first_step(
    make_dpo_trainer: Callable[..., Any],
    make_model: Callable[..., Any],
    reference: Callable[..., Any],
) -> None:
    policy = make_model("llama", layers=4)
    callback = SpinalTrainerCallback(ref_model=reference(policy, make_model))
    trainer = make_dpo_trainer(callback, model=policy)
    with pytest.raises(ValueError, match="reference model"):
        trainer.train()
    assert trainer.state.global_step == 0


@pytest.mark.parametrize(
    ("arguments", "names"),
    [
        pytest.param({"late_layers": [1, 99]}, "99", id="late_layers out of range"),
        pytest.param({"probe_texts": ["word " * 900], "max_probe_length": 1024}, "context"),
        pytest.param(
            {"probe_texts": [f"{SHARED_START} {word}" for word in WORDS], "max_probe_length": 8},
            "identical rows",
            id="texts identical at max_probe_length",
        ),
    ],
)
def test_a_probe_the_model_cannot_take_is_refused_before_the_first_step(
    make_dpo_trainer: Callable[..., Any], arguments: dict[str, Any], names: str
) -> None:
    trainer = make_dpo_trainer(SpinalTrainerCallback(**arguments))
    with pytest.raises(ValueError, match=names):
        trainer.train()
    assert trainer.state.global_step == 0


def test_a_missing_tokenizer_is_refused_before_the_first_step(
    make_dpo_trainer: Callable[..., Any],
) -> None:
    trainer = make_dpo_trainer(SpinalTrainerCallback())
    trainer.callback_handler.processing_class = None
    with pytest.raises(ValueError, match="tokenizer"):
        trainer.train()
