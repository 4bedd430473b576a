"""The README's Python snippets run as written: copied into a fresh interpreter on a machine with
no GPU and no network, in an empty directory, they finish and write what they say they write.

Every fenced ```` ```python ```` block of README.md runs, each in its own subprocess. A block that
is not meant to run is marked on the line before its fence with
``<!-- readme-test: skip (why it cannot run) -->``. The subprocess sees:

- no GPU (``CUDA_VISIBLE_DEVICES=""``), the case the TRL quick start once failed on;
- no model hub (``HF_HUB_OFFLINE=1`` and a fresh, empty ``HF_HOME``);
- only the installed package: ``spinal_callback`` is put on the path by itself, so a snippet
  that needs ``recipes/``, ``bench/`` or ``tests/`` fails here as it would for a user;
- one OpenMP thread, so the three trainings fit in about a minute on two shared cores (the
  snippets themselves leave threads alone).
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
SKIP = re.compile(r"<!--\s*readme-test:\s*skip\s*(?P<why>.*?)\s*-->")
TIMEOUT_S = 180

EXPECTED_FILES = {
    "Quick start: TRL `DPOTrainer`": ["out/runs/spinal/events.out.tfevents.*"],
    "Quick start: Lightning": ["tb/lightning_logs/version_0/events.out.tfevents.*"],
    "Quick start: probe a model by hand": ["traces/step0/trace.json"],
}
"""What each quick start says it writes, relative to the directory it runs in."""


@dataclass(frozen=True)
class Block:
    """One fenced Python block: the ``##`` section it sits in, its first line number in the
    README (1-based, the line after the fence), its code, and why it is skipped (or ``None``)."""

    section: str
    line: int
    code: str
    skip: str | None


def python_blocks(text: str) -> list[Block]:
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
            marker = SKIP.search(previous)
            skip = (marker.group("why") or "no reason given") if marker else None
            code = "\n".join(lines[index + 1 : end]) + "\n"
            blocks.append(Block(section, index + 2, code, skip))
            index = end
        if line.strip():
            previous = line
        index += 1
    return blocks


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


def block_ids(blocks: list[Block]) -> list[str]:
    """Test ids from the section titles (``quick-start-lightning``), numbered when a section has
    more than one block; stable when text elsewhere in the README moves."""
    ids: list[str] = []
    seen: dict[str, int] = {}
    for block in blocks:
        words = re.sub(r"[^a-z0-9]+", "-", block.section.lower()).strip("-") or "top"
        seen[words] = seen.get(words, 0) + 1
        ids.append(f"{words}-{seen[words]}" if seen[words] > 1 else words)
    return ids


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
    first, second = python_blocks(text)
    assert (first.section, first.line, first.code, first.skip) == (
        "Quick start: A",
        4,
        "x = 1\n",
        None,
    )
    assert (second.section, second.skip) == ("Other", "(needs a GPU)")
    assert block_ids([first, second, first]) == ["quick-start-a", "other", "quick-start-a-2"]


def test_every_quick_start_section_has_a_block_that_runs() -> None:
    sections = {block.section for block in BLOCKS if block.skip is None}
    assert set(EXPECTED_FILES) <= sections
    text = README.read_text(encoding="utf-8")
    quick_starts = re.findall(r"^## (Quick start:.*)$", text, flags=re.MULTILINE)
    assert quick_starts and set(quick_starts) <= sections


def test_a_block_marked_not_to_run_says_why() -> None:
    unexplained = [block.line for block in BLOCKS if block.skip in ("", "no reason given")]
    assert not unexplained, f"README.md lines {unexplained}: say why the block cannot run"


@pytest.mark.slow
@pytest.mark.parametrize("block", BLOCKS, ids=block_ids(BLOCKS))
def test_readme_python_block_runs_offline_on_a_cpu(block: Block, tmp_path: Path) -> None:
    if block.skip is not None:
        pytest.skip(f"README.md:{block.line} is marked not to run: {block.skip}")
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
        f"README.md:{block.line} ({block.section}) failed as written:\n{result.stderr[-4000:]}"
    )
    for pattern in EXPECTED_FILES.get(block.section, []):
        assert list(work.glob(pattern)), f"{block.section}: wrote no {pattern}"
