"""Probe text: the built-in neutral text, and the check every user-given list of texts passes.

A DPO run trains on its preference pairs; how much the model changes on text outside them tells
learning from damage. These sentences cover everyday topics in plain prose, with no instruction,
question or reply in them, so no preference data set is likely to contain them. Pass
``neutral_texts=`` to the callbacks for a model of another language or domain.

``check_texts`` is the one check for a list of texts given by the user (``probe_texts=``,
``neutral_texts=``, ``ProbeBatch.from_texts``): it raises at setup, naming the argument and the
offending positions, instead of letting a bare string be split into characters or an empty list
fall back to something else.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from typing import Any

logger = logging.getLogger("spinal_callback")

# What ``None`` means for each callback argument, for the error on an empty list.
_NONE_MEANS = {
    "probe_texts": "pass None to take prompts from the train dataset",
    "neutral_texts": (
        "pass None to use the built-in neutral texts (texts.DEFAULT_NEUTRAL_TEXTS) or "
        "neutral_probe=False to turn the neutral probe off"
    ),
}

DEFAULT_NEUTRAL_TEXTS = (
    "The bakery on the corner opens at six, and by seven there is a queue for the bread.",
    "Most of the rain that falls on the hills runs into the river within a few days.",
    "The library moved its old newspapers to the basement when the new wing was built.",
    "A train left the station a little late, but it reached the coast on time.",
    "In the autumn the leaves of the maple turn red before they fall to the ground.",
    "The village school has two classrooms, a small garden and a field for football.",
    "Her grandfather kept bees behind the house and sold the honey at the market.",
    "The bridge was closed for repairs, so the buses took the long road through town.",
    "Cats often sleep for most of the day and hunt in the early morning or at dusk.",
    "The museum's new exhibition shows tools that farmers used two hundred years ago.",
    "When the tide goes out, children search the rocks for crabs and small fish.",
    "The factory made bicycles until the nineteen seventies, when it became a warehouse.",
    "Snow covered the roads overnight, and the first cars moved slowly down the hill.",
    "The orchestra practised the symphony for three weeks before the first concert.",
    "Wheat is harvested in late summer, dried, and stored in tall silos near the farm.",
    "The old map showed a path through the forest that no one had walked for years.",
)


def check_texts(texts: Iterable[str], argument_name: str) -> list[str]:
    """``texts`` as a new list of strings, after checking it can serve as a probe.

    Args:
        texts: the user's texts: a list, tuple or other ordered iterable of strings.
        argument_name: the name the user gave them under (``"probe_texts"``,
            ``"neutral_texts"``), used in every message.

    Returns:
        the texts, in order and unchanged (duplicates are kept).

    Raises:
        TypeError: ``texts`` is a single string, a mapping, a set (no fixed order, so the probe
            would change between runs) or not iterable; or an element is not a string (the
            message names its position).
        ValueError: ``texts`` is empty; an element is empty or only whitespace (its position is
            named); or there are two or more texts and all are the same.

    Repeated texts add the same activations again, so every layer's activation spectrum is
    rank-deficient and the contraction score measures the repetition. They are kept as given
    (the probe stays the user's) with a ``UserWarning`` and a logged warning counting them.

    Example:
        >>> check_texts(("The river is low.", "Snow fell overnight."), "probe_texts")
        ['The river is low.', 'Snow fell overnight.']
    """
    items = _as_list(texts, argument_name)
    if not items:
        fix = f"{_NONE_MEANS[argument_name]}, or" if argument_name in _NONE_MEANS else "pass"
        raise ValueError(f"{argument_name} is empty: {fix} a non-empty list of strings")
    not_strings = [i for i, text in enumerate(items) if not isinstance(text, str)]
    if not_strings:
        kinds = ", ".join(f"{i}: {type(items[i]).__name__}" for i in not_strings[:5])
        raise TypeError(
            f"{argument_name} must hold only strings; positions {not_strings[:5]} are not "
            f"strings ({kinds}): pass a list of strings"
        )
    blank = [i for i, text in enumerate(items) if not text.strip()]
    if blank:
        raise ValueError(
            f"{argument_name} at positions {blank[:5]} tokenize to nothing: they are empty or "
            f"only whitespace ({[items[i] for i in blank[:3]]!r}); remove them"
        )
    _check_distinct(items, argument_name)
    return items


def _as_list(texts: object, argument_name: str) -> list[Any]:
    if isinstance(texts, (str, bytes)):
        raise TypeError(
            f"{argument_name} is a single string ({texts[:60]!r}), which would be read one "
            f"character at a time; pass a list of strings, e.g. {argument_name}=[text]"
        )
    if isinstance(texts, AbstractSet):
        raise TypeError(
            f"{argument_name} is a {type(texts).__name__}, which has no fixed order, so the "
            "probe would change between runs; pass a list of strings"
        )
    if isinstance(texts, Mapping) or not isinstance(texts, Iterable):
        raise TypeError(
            f"{argument_name} must be a list of strings, got {type(texts).__name__} "
            f"{str(texts)[:80]!r}; pass a list of strings"
        )
    return list(texts)


def _check_distinct(texts: list[str], argument_name: str) -> None:
    """Raise when all texts are one text; warn when some are repeated."""
    distinct = len(set(texts))
    if distinct == 1 and len(texts) > 1:
        raise ValueError(
            f"{argument_name} holds one text repeated {len(texts)} times ({texts[0][:60]!r}): "
            "the contraction needs distinct texts (every layer's activation spectrum would be "
            "that of one text); pass different texts"
        )
    repeats = len(texts) - distinct
    if repeats:
        message = (
            f"{argument_name} holds {repeats} duplicate text(s) among {len(texts)} "
            f"({distinct} distinct): the contraction needs distinct texts, and repeats make "
            "every layer's activation spectrum rank-deficient. The texts are used as given; "
            "remove the duplicates for a sound probe"
        )
        warnings.warn(message, UserWarning, stacklevel=3)
        logger.warning("spinal-callback: %s", message)
