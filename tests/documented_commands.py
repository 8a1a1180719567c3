"""The code the documentation shows, read from the documents: the fenced blocks of README.md, docs/*.md,
benchmarks/README.md and the docstrings of examples/*.py, and the commands of their ```bash blocks; and how a
command runs as a reader would run it (tests/test_documented_commands.py holds the tables and the tests).
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

DOCUMENTS = ("README.md", "docs/*.md", "benchmarks/README.md", "examples/*.py")
# what a command written for the repository's root reaches there (linked into the scratch folder it runs in)
ROOT_ENTRIES = ("examples", "benchmarks", "tests", "pytest.ini")
FENCE = re.compile(r"^```(\w*)\s*$")


@dataclass(frozen=True)
class Block:
    path: str  # relative to the root
    line: int  # of the block's first line of code
    language: str
    code: str


@dataclass(frozen=True)
class Command:
    text: str  # as written, continuation lines joined, the trailing comment dropped
    path: str
    line: int

    @property
    def key(self) -> str:
        """The text with its spaces collapsed: what the tables list."""
        return " ".join(self.text.split())

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


def document_paths(root: Path) -> list[Path]:
    return [path for pattern in DOCUMENTS for path in sorted(root.glob(pattern))]


class MalformedFence(ValueError):
    pass


def fenced_blocks(root: Path, language: str) -> list[Block]:
    """Every ```language block of the documents, in order. A fence line with text after it is refused: Markdown
    does not close a block there, so the block would run on and swallow what follows (as a reader sees it)."""
    blocks = []
    for path in document_paths(root):
        lines = path.read_text(encoding="utf-8").splitlines()
        start, fence_language = None, None
        for number, line in enumerate(lines, 1):
            fence = FENCE.match(line)
            if line.startswith("```") and not fence:
                raise MalformedFence(f"{path.relative_to(root)}:{number}: text after a code fence: {line[:60]!r}")
            if fence and start is None:
                start, fence_language = number, fence.group(1)
            elif line.strip() == "```" and start is not None:
                if fence_language == language:
                    blocks.append(Block(str(path.relative_to(root)), start + 1, language,
                                        "\n".join(lines[start:number - 1]) + "\n"))
                start = None
    return blocks


def without_comment(line: str) -> str:
    """``line`` up to a ``#`` that starts a shell comment (at the start or after a space, outside quotes)."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def block_commands(block: Block) -> list[Command]:
    """The block's commands: a line ending in ``\\`` continues on the next; comments and blank lines dropped."""
    commands, pending, first = [], "", 0
    for number, line in enumerate(block.code.splitlines(), block.line):
        text = without_comment(line)
        if not pending:
            first = number
        if text.endswith("\\"):
            pending += text[:-1].rstrip() + " "
            continue
        text = (pending + text.strip()).strip()
        pending = ""
        if text:
            commands.append(Command(text, block.path, first))
    return commands


def documented_commands(root: Path) -> list[Command]:
    return [command for block in fenced_blocks(root, "bash") for command in block_commands(block)]


def shortened(text: str, flags: str) -> str:
    """``text`` with ``flags`` added last among its own options: before a standalone ``--`` (after which
    upo-frontier's flags are upo-train's), else at the end. Given last, a flag the command sets is overridden."""
    words = shlex.split(text)
    if "--" in words:
        head, _, tail = text.partition(" -- ")
        return f"{head} {flags} -- {tail}"
    return f"{text} {flags}"


def reader_environment() -> dict:
    """A reader's shell: this interpreter's scripts (upo-train, torchrun, pytest, python) first on PATH, no
    pytest or Triton-interpreter state, no $OUT redirecting the benchmarks; one thread per process."""
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("PYTEST_", "TRITON_INTERPRET", "UPO_", "COV_")) and name != "OUT"}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return env


def scratch_folder(root: Path, folder: Path) -> Path:
    """``folder`` made to look like the repository's root to a command: its examples/, benchmarks/, tests/ and
    pytest.ini there as folders of links to the files, so that what a command writes (``--out
    benchmarks/results/...``, ``.benchmarks/``, ``upo-output/``) stays in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ROOT_ENTRIES:
        source = root / name
        sources = [source] if source.is_file() else [source, *sorted(source.rglob("*"))]
        for path in sources:
            if "__pycache__" in path.parts:
                continue
            target = folder / path.relative_to(root)
            if path.is_dir():
                target.mkdir(parents=True, exist_ok=True)
            elif not target.exists():
                target.symlink_to(path)
    return folder


def run_in(folder: Path, text: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", text], cwd=folder, env=reader_environment(), capture_output=True,
                          text=True, timeout=timeout)
