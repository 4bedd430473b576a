"""The documentation's Python snippets run as written: copied into a fresh interpreter on a machine
with no GPU and no network, in an empty directory, they finish and write what they say they write.

Every fenced ```` ```python ```` block of README.md and of docs/*.md runs, each in its own
subprocess. A block that is not meant to run is marked on the line before its fence with
``<!-- readme-test: skip (why it cannot run) -->``; a marker without a reason, or one that no
Python block follows, fails. The subprocess sees:

- no GPU (``CUDA_VISIBLE_DEVICES=""``), the case the TRL quick start once failed on;
- no model hub (``HF_HUB_OFFLINE=1`` and a fresh, empty ``HF_HOME``);
- only the installed package: ``spinal_callback`` is put on the path by itself, so a snippet
  that needs ``recipes/``, ``bench/`` or ``tests/`` fails here as it would for a user;
- one OpenMP thread, so the three trainings fit in about a minute on two shared cores (the
  snippets themselves leave threads alone).

The README stays a front page (at most ``README_MAX_LINES`` lines), and every relative link of
these files points to a file that exists (and, for a ``.md#anchor`` link, to a heading in it).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCUMENTS = [README, *sorted((ROOT / "docs").glob("*.md"))]
MARKER = re.compile(r"^<!--\s*readme-test:\s*(?P<body>.*?)\s*-->\s*$")
SKIP = re.compile(r"^skip\b\s*(?P<why>.*)$", flags=re.DOTALL)
TIMEOUT_S = 180
README_MAX_LINES = 260

EXPECTED_FILES = {
    ("README.md", "Quick start: TRL `DPOTrainer`"): ["out/runs/spinal/events.out.tfevents.*"],
    ("README.md", "Quick start: Lightning"): ["tb/lightning_logs/version_0/events.out.tfevents.*"],
    ("README.md", "Quick start: probe a model by hand"): ["traces/step0/trace.json"],
}
"""What each quick start says it writes, relative to the directory it runs in, keyed by
(file, ``##`` section)."""


@dataclass(frozen=True)
class Block:
    """One fenced Python block: the file it is in (relative to the repository), the ``##`` section
    it sits in, its first line number (1-based, the line after the fence), its code, and why it
    is skipped: ``None`` when it runs, ``""`` when a marker says skip without saying why."""

    source: str
    section: str
    line: int
    code: str
    skip: str | None


@dataclass(frozen=True)
class Marker:
    """One ``<!-- readme-test: ... -->`` line: its line number, the reason it gives for skipping
    (``None`` if it is not a ``skip`` marker, ``""`` if it gives none), and whether the next
    non-blank line opens a Python block."""

    line: int
    skip: str | None
    before_python: bool


def skip_reason(body: str) -> str | None:
    """The reason a marker's body (``skip (needs a GPU)``) gives, without its parentheses:
    ``"needs a GPU"``; ``""`` for ``skip`` or ``skip ()``; ``None`` if it does not say skip."""
    match = SKIP.match(body.strip())
    if match is None:
        return None
    why = match.group("why").strip()
    if why.startswith("(") and why.endswith(")"):
        why = why[1:-1].strip()
    return why


def markers(text: str) -> list[Marker]:
    """Every marker line of a Markdown ``text`` (a marker starts its line; an indented or quoted
    example of one is not a marker)."""
    lines = text.splitlines()
    found: list[Marker] = []
    for index, line in enumerate(lines):
        match = MARKER.match(line)
        if match is None:
            continue
        following = next((later for later in lines[index + 1 :] if later.strip()), "")
        found.append(
            Marker(index + 1, skip_reason(match.group("body")), following.strip() == "```python")
        )
    return found


def python_blocks(text: str, source: str = "README.md") -> list[Block]:
    """Every ```` ```python ```` block of a Markdown ``text``, in order."""
    blocks: list[Block] = []
    section, previous, lines = "", "", text.splitlines()
    index = 0
    while index < len(lines):
        line = lines[index]
        if line.startswith("## "):
            section = line[3:].strip()
        if line.strip() == "```python":
            end = next(i for i in range(index + 1, len(lines)) if lines[i].strip() == "```")
            marker = MARKER.match(previous)
            skip = skip_reason(marker.group("body")) if marker else None
            code = "\n".join(lines[index + 1 : end]) + "\n"
            blocks.append(Block(source, section, index + 2, code, skip))
            index = end
        if line.strip():
            previous = line
        index += 1
    return blocks


def marker_problems(text: str, source: str) -> list[str]:
    """What is wrong with the markers of a Markdown ``text``, one line per marker: a skip that
    says not why, a marker that is not a skip, or one that no Python block follows."""
    problems: list[str] = []
    for marker in markers(text):
        where = f"{source}:{marker.line}"
        if marker.skip is None:
            problems.append(f"{where}: not a skip marker; write <!-- readme-test: skip (why) -->")
        elif not marker.skip:
            problems.append(f"{where}: the skip gives no reason; say why the block cannot run")
        if not marker.before_python:
            problems.append(f"{where}: no ```python block follows the marker")
    return problems


def relative_path(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


TEXTS = {relative_path(path): path.read_text(encoding="utf-8") for path in DOCUMENTS}
BLOCKS = [block for source, text in TEXTS.items() for block in python_blocks(text, source)]


def block_ids(blocks: list[Block]) -> list[str]:
    """Test ids from the file and the section title (``README.md:quick-start-lightning``),
    numbered when a section has more than one block; stable when text elsewhere moves."""
    ids: list[str] = []
    seen: dict[str, int] = {}
    for block in blocks:
        words = re.sub(r"[^a-z0-9]+", "-", block.section.lower()).strip("-") or "top"
        name = f"{block.source}:{words}"
        seen[name] = seen.get(name, 0) + 1
        ids.append(f"{name}-{seen[name]}" if seen[name] > 1 else name)
    return ids


LINK = re.compile(r"!?\[[^\]]*\]\((?P<target>[^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^\s*(```|~~~)")
CODE_SPAN = re.compile(r"`[^`]*`")
URL = re.compile(r"^[a-z][a-z0-9+.-]*:", flags=re.IGNORECASE)


def relative_links(text: str) -> list[tuple[int, str]]:
    """``(line, target)`` of every Markdown link or image of ``text`` that is not a URL or an
    in-page anchor, outside fenced blocks and code spans."""
    links: list[tuple[int, str]] = []
    in_fence = False
    for number, line in enumerate(text.splitlines(), start=1):
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        for match in LINK.finditer(CODE_SPAN.sub("", line)):
            target = match.group("target")
            if not URL.match(target) and not target.startswith("#"):
                links.append((number, target))
    return links


def heading_anchors(text: str) -> set[str]:
    """The anchors GitHub gives the headings of a Markdown ``text``: lower case, punctuation
    dropped, spaces as hyphens."""
    anchors: set[str] = set()
    in_fence = False
    for line in text.splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
        elif not in_fence and (heading := re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)):
            words = re.sub(r"[^\w\- ]", "", heading.group(1).lower())
            anchors.add(words.replace(" ", "-"))
    return anchors


def markdown_anchors(path: Path) -> set[str]:
    return heading_anchors(path.read_text(encoding="utf-8"))


def broken_links(source: Path, text: str) -> list[str]:
    """The relative links of ``text`` (the contents of ``source``) whose file does not exist, or
    whose ``#anchor`` names no heading of the Markdown file it points to."""
    broken: list[str] = []
    for number, target in relative_links(text):
        path_part, _, anchor = target.partition("#")
        path = (source.parent / path_part).resolve()
        where = f"{source.name}:{number}: {target}"
        if not path.exists():
            broken.append(f"{where} (no such file)")
        elif anchor and path.suffix == ".md" and anchor not in markdown_anchors(path):
            broken.append(f"{where} (no heading #{anchor})")
    return broken


def offline_cpu_environment(scratch: Path) -> dict[str, str]:
    """The environment of a user with this package installed, no GPU and no network."""
    site = scratch / "site"
    site.mkdir()
    (site / "spinal_callback").symlink_to(ROOT / "spinal_callback", target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TENSORBOARD_", "WANDB_"))}
    env.update(
        PYTHONPATH=str(site),
        CUDA_VISIBLE_DEVICES="",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_HOME=str(scratch / "hf_home"),
        OMP_NUM_THREADS="1",
        MPLBACKEND="Agg",
        TOKENIZERS_PARALLELISM="false",
    )
    return env


def test_the_readme_parser_finds_fences_sections_and_skip_markers() -> None:
    text = (
        "## Quick start: A\n\n```python\nx = 1\n```\n\n## Other\n"
        "<!-- readme-test: skip (needs a GPU) -->\n```python\nimport cuda\n```\n```bash\nls\n```\n"
    )
    first, second = python_blocks(text, "docs/a.md")
    assert (first.source, first.section, first.line, first.code, first.skip) == (
        "docs/a.md",
        "Quick start: A",
        4,
        "x = 1\n",
        None,
    )
    assert (second.section, second.skip) == ("Other", "needs a GPU")
    assert block_ids([first, second, first]) == [
        "docs/a.md:quick-start-a",
        "docs/a.md:other",
        "docs/a.md:quick-start-a-2",
    ]


@pytest.mark.parametrize("marker", ["skip", "skip ()", "skip (  )", "skip  "])
def test_a_skip_marker_without_a_reason_is_reported(marker: str) -> None:
    text = f"## A\n\n<!-- readme-test: {marker} -->\n```python\nimport cuda\n```\n"
    (block,) = python_blocks(text)
    assert block.skip == ""
    assert marker_problems(text, "docs/a.md") == [
        "docs/a.md:3: the skip gives no reason; say why the block cannot run"
    ]


def test_a_marker_that_is_not_a_skip_or_guards_no_python_block_is_reported() -> None:
    text = (
        "<!-- readme-test: skp (typo) -->\n```python\nx = 1\n```\n\n"
        "<!-- readme-test: skip (a shell command) -->\n```bash\nls\n```\n\n"
        "    <!-- readme-test: skip -->  an indented example, not a marker\n"
        "<!-- readme-test: skip (needs a GPU) -->\n\n```python\nimport cuda\n```\n"
    )
    assert marker_problems(text, "a.md") == [
        "a.md:1: not a skip marker; write <!-- readme-test: skip (why) -->",
        "a.md:6: no ```python block follows the marker",
    ]


def test_every_quick_start_section_has_a_block_that_runs() -> None:
    sections = {(block.source, block.section) for block in BLOCKS if block.skip is None}
    assert set(EXPECTED_FILES) <= sections
    quick_starts = re.findall(r"^## (Quick start:.*)$", TEXTS["README.md"], flags=re.MULTILINE)
    assert quick_starts and {("README.md", title) for title in quick_starts} <= sections


@pytest.mark.parametrize("source", list(TEXTS))
def test_a_block_marked_not_to_run_says_why(source: str) -> None:
    problems = marker_problems(TEXTS[source], source)
    assert not problems, "\n".join(problems)


def test_the_readme_is_a_front_page() -> None:
    lines = len(TEXTS["README.md"].splitlines())
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines, over {README_MAX_LINES}: move the detail into docs/"
    )
    assert "make test" in TEXTS["README.md"]


def test_the_link_checker_finds_a_broken_link_and_ignores_code_and_urls() -> None:
    text = (
        "[ok](docs/alerts.md) ![shot](docs/custom_scalars.png) [web](https://example.org)\n"
        "[gone](docs/nowhere.md) `[code](no.md)` [top](#top) [bad anchor](docs/alerts.md#nope)\n"
        "```bash\n[in a fence](nowhere.md)\n```\n"
    )
    assert broken_links(README, text) == [
        "README.md:2: docs/nowhere.md (no such file)",
        "README.md:2: docs/alerts.md#nope (no heading #nope)",
    ]


@pytest.mark.parametrize("source", list(TEXTS))
def test_every_relative_link_points_to_an_existing_file(source: str) -> None:
    broken = broken_links(ROOT / source, TEXTS[source])
    assert not broken, "\n".join(broken)


@pytest.mark.slow
@pytest.mark.parametrize("block", BLOCKS, ids=block_ids(BLOCKS))
def test_readme_python_block_runs_offline_on_a_cpu(block: Block, tmp_path: Path) -> None:
    where = f"{block.source}:{block.line}"
    if block.skip is not None:
        pytest.skip(f"{where} is marked not to run: {block.skip or 'no reason given'}")
    work = tmp_path / "work"
    work.mkdir()
    script = work / "snippet.py"
    script.write_text(block.code, encoding="utf-8")
    result = subprocess.run(
        [sys.executable, str(script)],
        cwd=work,
        env=offline_cpu_environment(tmp_path),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert result.returncode == 0, (
        f"{where} ({block.section}) failed as written:\n{result.stderr[-4000:]}"
    )
    for pattern in EXPECTED_FILES.get((block.source, block.section), []):
        assert list(work.glob(pattern)), f"{where} ({block.section}): wrote no {pattern}"
