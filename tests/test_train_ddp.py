"""Two CPU processes (torchrun, gloo, DDP) give the same parameters as one process with the same global batch."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import upo

REPO_ROOT = Path(upo.__file__).resolve().parent.parent
MICRO = json.dumps({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                    "num_key_value_heads": 2})


def train(output_dir: Path, processes: int, *extra: str) -> dict:
    """Run upo-train (under torchrun when ``processes > 1``) and return the final checkpoint."""
    args = ["--model-config", MICRO, "--output-dir", str(output_dir), "--max-examples", "16", "--batch-size", "4",
            "--grad-accum", "2", "--max-steps", "3", "--eval-fraction", "0.25", "--eval-every", "2",
            "--backend", "torch", "--device", "cpu", "--no-progress", *extra]
    if processes == 1:
        command = [sys.executable, "-m", "upo.train", *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
                   "-m", "upo.train", *args]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(output_dir / "checkpoints" / "checkpoint-000003.pt", map_location="cpu", weights_only=False)


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(tmp_path):
    single = train(tmp_path / "single", 1)
    ddp = train(tmp_path / "ddp", 2)
    assert single["model"].keys() == ddp["model"].keys()
    for name, expected in single["model"].items():
        assert torch.allclose(ddp["model"][name], expected, rtol=0, atol=1e-5), name
    assert single["position"] == ddp["position"]
    # Rank 0 alone writes the outputs; the logged metrics are the same global means.
    one = [json.loads(line) for line in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
        assert b["tokens"] == a["tokens"]
        if "eval/loss" in a:
            assert b["eval/loss"] == pytest.approx(a["eval/loss"], rel=1e-5)
    assert json.loads((tmp_path / "ddp" / "summary.json").read_text())["world_size"] == 2


@pytest.mark.slow
def test_torchrun_launches_the_console_script(tmp_path):
    """``torchrun ... $(which upo-train)``: the installed script is a plain Python file torchrun can run."""
    script = shutil.which("upo-train") or str(Path(sys.executable).with_name("upo-train"))
    if not Path(script).is_file():
        pytest.skip("upo-train is not installed in this environment")
    args = ["--model-config", MICRO, "--output-dir", str(tmp_path / "out"), "--max-examples", "8", "--batch-size", "4",
            "--max-steps", "1", "--eval-fraction", "0", "--backend", "torch", "--device", "cpu", "--no-progress"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", script, *args]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["world_size"] == 2
