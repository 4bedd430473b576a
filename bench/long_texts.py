"""Probe texts of realistic length, offline: paragraphs of the Python standard library's own
docstrings (English prose of 300-900 characters, 60-200 tokens each).

Two disjoint splits, from different modules: ``dev`` for choosing settings, ``test`` for checking
them once they are chosen.

    python -m bench.long_texts dev    # prints the split's texts, one per line
"""

from __future__ import annotations

import importlib
import inspect
import random
import re
import sys

SPLITS = {
    "dev": (
        "argparse",
        "json",
        "textwrap",
        "logging",
        "unittest",
        "collections",
        "functools",
        "itertools",
        "subprocess",
    ),
    "test": (
        "email",
        "http.client",
        "pathlib",
        "tarfile",
        "zipfile",
        "datetime",
        "decimal",
        "threading",
        "asyncio",
        "typing",
        "inspect",
    ),
}
MIN_CHARS, MAX_CHARS = 300, 900


def long_texts(split: str, count: int | None = 32) -> list[str]:
    """``count`` (``None``: all) prose paragraphs of ``split`` (``"dev"``: 37, ``"test"``: 68),
    in a fixed order."""
    paragraphs: set[str] = set()
    for name in SPLITS[split]:
        module = importlib.import_module(name)
        for member in [module, *(getattr(module, a) for a in dir(module) if not a.startswith("_"))]:
            for paragraph in re.split(r"\n\s*\n", inspect.getdoc(member) or ""):
                text = " ".join(paragraph.split())
                if _is_prose(text):
                    paragraphs.add(text)
    ordered = sorted(paragraphs)
    random.Random(split).shuffle(ordered)
    if count is None:
        return ordered
    if len(ordered) < count:
        raise ValueError(f"the {split!r} split has {len(ordered)} paragraphs, {count} asked for")
    return ordered[:count]


def long_pairs(count: int, split: str = "dev") -> list[dict[str, str]]:
    """``count`` preference rows of realistic length: a paragraph's first 40% of words as the
    prompt, its rest as ``chosen`` and the rest of the next paragraph as ``rejected`` (the
    paragraphs repeat in order when ``count`` exceeds them)."""
    texts = [text.split() for text in long_texts(split, None)]
    rows = []
    for i in range(count):
        words, other = texts[i % len(texts)], texts[(i + 1) % len(texts)]
        cut, other_cut = int(0.4 * len(words)), int(0.4 * len(other))
        rows.append(
            {
                "prompt": " ".join(words[:cut]),
                "chosen": " " + " ".join(words[cut:]),
                "rejected": " " + " ".join(other[other_cut:]),
            }
        )
    return rows


def _is_prose(text: str) -> bool:
    return (
        MIN_CHARS <= len(text) <= MAX_CHARS
        and not text.startswith((">>>", "..."))
        and text.count("(") < 6
    )


if __name__ == "__main__":
    print("\n".join(long_texts(sys.argv[1] if len(sys.argv) > 1 else "dev")))
