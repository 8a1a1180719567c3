"""Two CPU processes (torchrun, gloo, DDP) give the same parameters as one process with the same global batch;
SIGTERM (to torchrun, or to one rank alone) stops both ranks at the same step with a checkpoint, and the
resumed run equals the uninterrupted one bit for bit."""
import json
import os
import random
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from helpers import new_seed
from train_helpers import (MICRO, assert_same_tensors, checkpoint, metrics_rows, run_upo_train, start_upo_train,
                          wait_for_rows, without_timing)

# The module's runs are shared by its tests: one xdist worker runs them all (pytest.ini: --dist loadgroup).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("torchrun")]
STEPS = 12
ARGS = ["--model-config", MICRO, "--max-examples", "16", "--batch-size", "4", "--grad-accum", "2", "--max-steps",
        str(STEPS), "--eval-fraction", "0.25", "--eval-every", "2", "--save-every", "4", "--backend", "torch",
        "--device", "cpu", "--no-progress"]


def train(output_dir: Path, processes: int, *extra: str) -> dict:
    """Run upo-train (under torchrun when ``processes > 1``) to the end and return the final checkpoint."""
    result = run_upo_train([*ARGS, "--output-dir", str(output_dir), *extra], processes)
    assert result.returncode == 0, result.stderr[-3000:]
    return checkpoint(output_dir, STEPS)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, Path]:
    runs = {"single": tmp_path_factory.mktemp("single"), "ddp": tmp_path_factory.mktemp("ddp")}
    train(runs["single"], 1)
    train(runs["ddp"], 2)
    return runs


def test_ddp_two_processes_match_one_process(uninterrupted):
    single = checkpoint(uninterrupted["single"], STEPS)
    ddp = checkpoint(uninterrupted["ddp"], STEPS)
    assert single["model"].keys() == ddp["model"].keys()
    for name, expected in single["model"].items():
        assert torch.allclose(ddp["model"][name], expected, rtol=0, atol=1e-5), name
    assert single["position"] == ddp["position"]
    # Rank 0 alone writes the outputs; the logged metrics are the same global means.
    one, two = metrics_rows(uninterrupted["single"]), metrics_rows(uninterrupted["ddp"])
    assert len(one) == len(two) == STEPS
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
        assert b["tokens"] == a["tokens"]
        if "eval/loss" in a:
            assert b["eval/loss"] == pytest.approx(a["eval/loss"], rel=1e-5)
    assert json.loads((uninterrupted["ddp"] / "summary.json").read_text())["world_size"] == 2


def _worker_pid(torchrun: subprocess.Popen, rank: int) -> int:
    """The pid of torchrun's worker of ``rank`` (Linux /proc)."""
    for child in Path(f"/proc/{torchrun.pid}/task/{torchrun.pid}/children").read_text().split():
        if f"RANK={rank}".encode() in Path(f"/proc/{child}/environ").read_bytes().split(b"\0"):
            return int(child)
    raise AssertionError(f"no worker of rank {rank}")


def _stop_under_torchrun(process, signal_rank1_only: bool, out: Path, at_row: int, seed) -> int:
    """SIGTERM to torchrun (which passes it on to both ranks) or to rank 1 alone: both ranks stop at one
    step, rank 0 says so once and saves it. Returns that step."""
    wait_for_rows(process, out / "metrics.jsonl", at_row)
    if signal_rank1_only:  # rank 0 learns of it only through the per-step all-reduce
        os.kill(_worker_pid(process, 1), signal.SIGTERM)
    else:
        process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    # torchrun reports the signal (or the workers' 143) its own way, exit status 1.
    stops = [line for line in err.splitlines() if line.startswith("upo-train: stopped by SIGTERM after step ")]
    assert len(stops) == 1 and "upo-train: error" not in err, (seed, err[-3000:])
    step = int(stops[0].split(" after step ")[1].split()[0])
    assert [r["step"] for r in metrics_rows(out)] == list(range(1, step + 1)), seed
    assert checkpoint(out, step)["step"] == step
    return step


def test_sigterm_under_torchrun_then_resume_equals_the_uninterrupted_run(uninterrupted, tmp_path):
    seed = new_seed()
    rng = random.Random(seed)
    out = tmp_path / "out"
    args = [*ARGS, "--output-dir", str(out)]
    step = _stop_under_torchrun(start_upo_train(args, processes=2), False, out, rng.randint(1, 3), seed)
    if Path("/proc/self/task").is_dir():
        process = start_upo_train([*args, "--resume", "auto"], processes=2)
        step = _stop_under_torchrun(process, True, out, step + rng.randint(1, 3), seed)

    resumed = run_upo_train([*args, "--resume", "auto"], processes=2)
    assert resumed.returncode == 0, (seed, resumed.stderr[-3000:])
    assert_same_tensors(checkpoint(uninterrupted["ddp"], STEPS)["model"], checkpoint(out, STEPS)["model"],
                        f"torchrun stopped twice, resumed vs uninterrupted (seed {seed}, last stop {step})")
    assert without_timing(metrics_rows(out)) == without_timing(metrics_rows(uninterrupted["ddp"])), seed


