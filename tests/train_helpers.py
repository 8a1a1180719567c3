"""Running ``upo-train`` in tests on the micro Llama: a :class:`Trainer` in-process, ``main()`` as the
command line, or a subprocess (plain or under torchrun) as a user runs it; reading back what a run wrote."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

import upo
from helpers import MICRO_MODEL
from upo.train.cli import main
from upo.train.config import build_config
from upo.train.runtime import setup_runtime
from upo.train.trainer import Trainer

MICRO = json.dumps(MICRO_MODEL)
REPO_ROOT = Path(upo.__file__).resolve().parent.parent
# Per-step numbers that depend on the wall clock or the process, not on the training.
TIMING_KEYS = {"tokens_per_s", "peak_memory_bytes"}


def micro_config(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path / "out"), model_config=MICRO_MODEL, max_examples=16, batch_size=4,
                    max_steps=4, eval_fraction=0.0, backend="torch", device="cpu", progress=False,
                    warmup_steps=0, save_every=1000, eval_every=1000)
    settings.update(overrides)
    return build_config({}, settings)


def make_trainer(tmp_path, **overrides) -> Trainer:
    config = micro_config(tmp_path, **overrides)
    return Trainer(config, setup_runtime("cpu"), log=lambda message: None)


def train_steps(trainer: Trainer, steps: int) -> list[dict]:
    return [trainer.train_step() for _ in range(steps)]


def parameters(trainer: Trainer) -> dict:
    return {name: p.detach().clone() for name, p in trainer.module.named_parameters()}


def micro_args(tmp_path, *extra):
    return ["--model-config", MICRO, "--output-dir", str(tmp_path / "out"), "--max-steps", "1", "--batch-size", "2",
            "--max-examples", "8", "--backend", "torch", "--device", "cpu", "--no-progress", *extra]


def run_main(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def assert_one_line_error(code, err, *fragments, alone=True, prog="upo-train"):
    """Exit status 2 and one ``upo-train: error:`` line (``prog``'s) holding every fragment (``alone``: the only
    line)."""
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    if alone:
        assert len(lines) == 1, err
    errors = [line for line in lines if line.startswith(f"{prog}: error: ")]
    assert len(errors) == 1 and errors[0] == lines[-1], err
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])


def subprocess_env() -> dict:
    # PYTHONFAULTHANDLER: a process that dies by a signal (SIGABRT, SIGSEGV) prints where its threads were
    return dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1")


def upo_train_command(args, processes: int = 1) -> list[str]:
    if processes == 1:
        return [sys.executable, "-m", "upo.train", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
            "-m", "upo.train", *args]


def run_upo_train(args, processes: int = 1, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(upo_train_command(args, processes), capture_output=True, text=True, env=subprocess_env(),
                          timeout=timeout)


def start_upo_train(args, processes: int = 1) -> subprocess.Popen:
    return subprocess.Popen(upo_train_command(args, processes), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=subprocess_env())


def complete_lines(path: Path) -> int:
    """Lines of a file that end with a newline (a line being written does not count)."""
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def wait_for_rows(process: subprocess.Popen, metrics: Path, rows: int, timeout: float = 240) -> None:
    """Block until ``metrics`` holds ``rows`` complete lines (the run has finished that many steps)."""
    deadline = time.monotonic() + timeout
    while complete_lines(metrics) < rows:
        if process.poll() is not None:
            out, err = process.communicate()
            raise AssertionError(f"run ended (status {process.returncode}) before step {rows}:\n{err[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"no step {rows} within {timeout} s")
        time.sleep(0.01)


def metrics_rows(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


def checkpoint(output_dir: Path, step: int) -> dict:
    return torch.load(output_dir / "checkpoints" / f"checkpoint-{step:06d}.pt", map_location="cpu",
                      weights_only=False)


def checkpoint_steps(output_dir: Path) -> list[int]:
    return sorted(int(p.stem.split("-")[1]) for p in (output_dir / "checkpoints").glob("checkpoint-*.pt"))


def assert_same_tensors(expected: dict, actual: dict, what: str) -> None:
    assert expected.keys() == actual.keys(), what
    for name, tensor in expected.items():
        assert torch.equal(tensor, actual[name]), f"{what}: {name} differs"
