"""The public API: what ``spinal_callback`` exports, and the module names of the flat layout of
0.1.0, which still import."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import spinal_callback
from spinal_callback import MOVED_MODULES


def test_every_name_in_all_imports_from_the_package() -> None:
    for name in spinal_callback.__all__:
        assert getattr(spinal_callback, name) is not None


def test_importing_the_package_loads_neither_transformers_nor_lightning() -> None:
    code = (
        "import sys, spinal_callback; "
        "print(any(m in sys.modules for m in ('transformers', 'lightning', 'trl')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "False", done.stderr


def test_the_callbacks_load_on_first_use() -> None:
    from spinal_callback.integrations.transformers import SpinalTrainerCallback

    assert spinal_callback.SpinalTrainerCallback is SpinalTrainerCallback


@pytest.mark.parametrize(("old", "new"), sorted(MOVED_MODULES.items()))
def test_a_module_of_the_flat_layout_is_the_module_at_its_new_place(old: str, new: str) -> None:
    assert importlib.import_module(old) is importlib.import_module(new)


def test_the_flat_layouts_from_imports_keep_working() -> None:
    from spinal_callback.events import Alert, EventLog
    from spinal_callback.tiny import build_tiny_model

    from spinal_callback.outputs import Outputs
    from spinal_callback.probe import ProbeBatch, SpinalProbe

    assert {Alert.__name__, EventLog.__name__, Outputs.__name__} == {"Alert", "EventLog", "Outputs"}
    assert (ProbeBatch.__name__, SpinalProbe.__name__, build_tiny_model.__name__) == (
        "ProbeBatch",
        "SpinalProbe",
        "build_tiny_model",
    )


def test_an_unknown_attribute_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        spinal_callback.Nope  # noqa: B018


def test_the_callbacks_take_config_and_probe_texts_positionally_as_documented() -> None:
    from spinal_callback.config import SpinalConfig
    from spinal_callback.integrations.lightning import SpinalCallback
    from spinal_callback.integrations.transformers import SpinalTrainerCallback

    texts = ["The first probe text.", "The second probe text."]
    for callback in (
        SpinalTrainerCallback(SpinalConfig(every_n_steps=7), texts),
        SpinalCallback(SpinalConfig(every_n_steps=7), texts),
    ):
        assert callback.config.every_n_steps == 7
        assert callback.runner._probe_texts == texts
