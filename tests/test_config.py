"""SpinalConfig: every field is type-checked at construction, and every error names it."""

from __future__ import annotations

import math
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from spinal_callback.config import MIN_PROBE_LENGTH, SpinalConfig

OPTIONAL_FIELDS = [
    item.name
    for item in fields(SpinalConfig)
    if type(None) in typing.get_args(typing.get_type_hints(SpinalConfig)[item.name])
]


def with_field(name: str, value: Any) -> SpinalConfig:
    """The default config with field ``name`` set to ``value``."""
    return SpinalConfig(**{name: value})


def test_a_string_for_a_float_field_is_converted() -> None:
    config = SpinalConfig(tail_low="0.1")  # type: ignore[arg-type]
    assert config.tail_low == 0.1
    assert type(config.tail_low) is float


def test_a_string_in_scientific_notation_is_converted_for_a_float_field() -> None:
    assert SpinalConfig(loss_spike_z="1e-3").loss_spike_z == 1e-3  # type: ignore[arg-type]


def test_a_string_of_digits_for_an_int_field_is_converted() -> None:
    config = SpinalConfig(every_n_steps="50")  # type: ignore[arg-type]
    assert config.every_n_steps == 50
    assert type(config.every_n_steps) is int


def test_an_int_for_a_float_field_is_stored_as_a_float() -> None:
    config = SpinalConfig(perplexity_critical=2)
    assert config.perplexity_critical == 2.0
    assert type(config.perplexity_critical) is float


def test_a_config_of_strings_as_yaml_may_give_equals_the_config_of_numbers() -> None:
    numbers = SpinalConfig(every_n_steps=20, tail_low=0.1, loss_spike_z=6.0, drift_every=3)
    strings = SpinalConfig(
        every_n_steps="20",  # type: ignore[arg-type]
        tail_low="0.1",  # type: ignore[arg-type]
        loss_spike_z="6",  # type: ignore[arg-type]
        drift_every="3",  # type: ignore[arg-type]
    )
    assert strings == numbers


@pytest.mark.parametrize(
    ("field", "value"),
    [("tail_low", "abc"), ("loss_spike_z", "8x"), ("every_n_steps", "fifty"), ("seed", "")],
)
def test_a_non_numeric_string_names_the_field(field: str, value: str) -> None:
    with pytest.raises(TypeError, match=rf"SpinalConfig\.{field} must be .*, got '{value}'"):
        with_field(field, value)


def test_a_fractional_string_for_an_int_field_is_rejected() -> None:
    with pytest.raises(TypeError, match=r"SpinalConfig\.seed must be an int.*got '1\.5'"):
        SpinalConfig(seed="1.5")  # type: ignore[arg-type]


def test_a_float_for_an_int_field_is_rejected() -> None:
    with pytest.raises(TypeError, match=r"spectrum_tokens must be an int.*got 512\.0 \(float\)"):
        SpinalConfig(spectrum_tokens=512.0)  # type: ignore[arg-type]


@pytest.mark.parametrize("field", ["seed", "tail_low", "drift_every", "perplexity_warning"])
def test_a_bool_is_not_a_number(field: str) -> None:
    with pytest.raises(TypeError, match=rf"SpinalConfig\.{field} .*got True \(bool\)"):
        with_field(field, True)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("perplexity_warning", math.nan),
        ("departure_critical", math.inf),
        ("tail_high", -math.inf),
        ("reversal_margin", "nan"),
        ("loss_spike_z", "inf"),
        ("tail_low", 10**400),
    ],
)
def test_a_non_finite_float_is_rejected_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"SpinalConfig\.{field} must be finite"):
        with_field(field, value)


def test_every_field_rejects_a_value_of_the_wrong_type_naming_the_field() -> None:
    for item in fields(SpinalConfig):
        with pytest.raises(TypeError, match=rf"SpinalConfig\.{item.name} must be .*\(object\)"):
            with_field(item.name, object())


def test_every_optional_field_accepts_none() -> None:
    config = SpinalConfig(**dict.fromkeys(OPTIONAL_FIELDS))  # type: ignore[arg-type]
    assert all(getattr(config, name) is None for name in OPTIONAL_FIELDS)


def test_none_is_rejected_for_a_field_that_is_not_optional() -> None:
    with pytest.raises(TypeError, match=r"SpinalConfig\.patience must be an int.*got None"):
        SpinalConfig(patience=None)  # type: ignore[arg-type]


def test_the_string_none_is_not_read_as_none_and_the_error_says_what_to_write() -> None:
    with pytest.raises(TypeError, match=r"drift_every .*got 'none'.*write null in YAML"):
        SpinalConfig(drift_every="none")  # type: ignore[arg-type]


def test_a_choice_field_rejects_a_number_listing_its_choices() -> None:
    choices = r"\['hellinger', 'fisher_rao', 'js'\]"
    with pytest.raises(
        TypeError, match=rf"SpinalConfig\.transport must be one of {choices}, got 3"
    ):
        SpinalConfig(transport=3)  # type: ignore[arg-type]


def test_event_log_rejects_a_number() -> None:
    with pytest.raises(TypeError, match=r"SpinalConfig\.event_log must be a path.*got 123"):
        SpinalConfig(event_log=123)  # type: ignore[arg-type]


def test_event_log_accepts_a_path_and_stores_a_str(tmp_path: Path) -> None:
    config = SpinalConfig(event_log=tmp_path / "events.jsonl")  # type: ignore[arg-type]
    assert config.event_log == str(tmp_path / "events.jsonl")


def test_a_blank_path_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"SpinalConfig\.blocks_path must not be blank"):
        SpinalConfig(blocks_path="  ")


def test_late_layers_rejects_a_string() -> None:
    with pytest.raises(TypeError, match=r"SpinalConfig\.late_layers must be a list of ints"):
        SpinalConfig(late_layers="12")  # type: ignore[arg-type]


@pytest.mark.parametrize("layers", [[1, "a"], [1, 2.5], [True, 2]])
def test_late_layers_rejects_an_element_that_is_not_an_int(layers: list[Any]) -> None:
    with pytest.raises(TypeError, match=r"SpinalConfig\.late_layers must be a list of ints"):
        SpinalConfig(late_layers=layers)


def test_late_layers_reads_a_tuple_of_int_strings_as_a_list() -> None:
    assert SpinalConfig(late_layers=("-2", "-1")).late_layers == [-2, -1]  # type: ignore[arg-type]


def test_late_layers_still_needs_two_blocks() -> None:
    with pytest.raises(ValueError, match="late_layers needs at least 2 blocks"):
        SpinalConfig(late_layers=[3])


def test_neutral_probe_must_be_a_bool() -> None:
    with pytest.raises(TypeError, match=r"SpinalConfig\.neutral_probe must be True or False"):
        SpinalConfig(neutral_probe="yes")  # type: ignore[arg-type]


@pytest.mark.parametrize("seed", [-1, 2**63])
def test_seed_must_fit_a_torch_generator(seed: int) -> None:
    with pytest.raises(ValueError, match=r"SpinalConfig\.seed must be an int >= 0"):
        SpinalConfig(seed=seed)


def test_a_converted_value_is_still_range_checked() -> None:
    with pytest.raises(ValueError, match="0 < tail_low < tail_high <= 1, got tail_low=0.9"):
        SpinalConfig(tail_low="0.9", tail_high="0.5")  # type: ignore[arg-type]


def test_the_range_message_of_an_int_field_is_kept() -> None:
    with pytest.raises(ValueError, match="every_n_steps must be an int >= 1, got 0"):
        SpinalConfig(every_n_steps="0")  # type: ignore[arg-type]


def test_a_choice_field_lists_the_choices_and_none_when_optional() -> None:
    with pytest.raises(ValueError, match=r"stop_on must be one of \['critical', 'warning'\] or"):
        SpinalConfig(stop_on="never")


def test_with_overrides_converts_and_checks_like_the_constructor() -> None:
    assert SpinalConfig().with_overrides(tail_low="0.1").tail_low == 0.1
    with pytest.raises(TypeError, match=r"SpinalConfig\.seed must be an int"):
        SpinalConfig().with_overrides(seed="zero")


def test_with_overrides_names_the_valid_fields_for_an_unknown_one() -> None:
    with pytest.raises(TypeError, match=r"unknown SpinalConfig field\(s\) \['every_n_step'\].*"):
        SpinalConfig().with_overrides(every_n_step=5)


def test_to_dict_rebuilds_the_same_config() -> None:
    config = SpinalConfig(late_layers=(-3, -2, -1), tail_low="0.1")  # type: ignore[arg-type]
    assert SpinalConfig(**config.to_dict()) == config


def test_an_unknown_lens_dtype_lists_the_choices() -> None:
    with pytest.raises(
        ValueError,
        match=r"lens_dtype must be one of \['auto', 'bfloat16', 'native'\], got 'float16'",
    ):
        SpinalConfig(lens_dtype="float16")


@pytest.mark.parametrize("length", [1, 2, MIN_PROBE_LENGTH - 1])
def test_a_max_probe_length_too_short_to_measure_is_rejected_naming_it_and_the_fix(
    length: int,
) -> None:
    with pytest.raises(
        ValueError,
        match=rf"max_probe_length must be an int >= 8, got {length}: .*max_probe_length >= 8",
    ):
        SpinalConfig(max_probe_length=length)


def test_the_shortest_max_probe_length_is_accepted() -> None:
    assert SpinalConfig(max_probe_length=MIN_PROBE_LENGTH).max_probe_length == 8
