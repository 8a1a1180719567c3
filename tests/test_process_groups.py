"""``--tp N`` and ``--cp N`` both form groups of N processes: what they refuse alike (a group size of 0, a process
count the size does not divide, said once by rank 0), how a DPOConfig's per-device batch counts under them, and
that a run under torchrun ends its groups' threads before the interpreter does."""
import os
import subprocess
import sys

import pytest

from train_helpers import assert_one_line_error, micro_args, run_main, subprocess_env

FLAGS = ["--tp", "--cp"]


@pytest.mark.parametrize("flag", FLAGS)
def test_group_size_zero_is_refused(flag, tmp_path, capsys):
    code, _, err = run_main(micro_args(tmp_path, flag, "0"), capsys)
    assert_one_line_error(code, err, f"{flag} must be an integer >= 1")


@pytest.mark.parametrize("flag", FLAGS)
@pytest.mark.parametrize("rank", ["0", "1"])
def test_group_size_not_dividing_the_processes_is_one_line_from_rank_0(flag, rank, tmp_path, capsys, monkeypatch):
    """Each rank refuses at once (before the process group or transformers); rank 0 alone prints it."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", rank)
    code, _, err = run_main(micro_args(tmp_path, flag, "3"), capsys)
    if rank == "0":
        assert_one_line_error(code, err, f"{flag} 3: the 2 processes are not a multiple of 3")
    else:
        assert code == 2 and err == ""


@pytest.mark.parametrize("flag", FLAGS)
def test_trl_per_device_batch_is_per_group(flag, tmp_path, monkeypatch):
    """A DPOConfig's per_device_train_batch_size: per model copy under --tp (4 processes / --tp 2 copies), per
    sequence group under --cp (the processes of one sequence share it)."""
    from upo.train.cli import parse_config

    monkeypatch.setenv("WORLD_SIZE", "4")
    path = tmp_path / "run.yaml"
    path.write_text(f"per_device_train_batch_size: 3\n{flag[2:]}: 2\n")
    assert parse_config(["--config", str(path)]).batch_size == 6
    assert parse_config(["--config", str(path), flag, "1"]).batch_size == 12


# upo-train's main() called as the console script calls it, then the native threads still running counted
THREADS_LEFT = """
import os, sys, threading
from upo.train.cli import main
status = main(sys.argv[1:])
print("native threads left:", len(os.listdir("/proc/self/task")) - threading.active_count(), flush=True)
sys.exit(status)
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts the process's threads in /proc")
def test_a_torchrun_run_joins_its_process_groups_threads_before_the_interpreter_ends(tmp_path):
    """destroy_process_group leaves gloo's worker threads running while the mesh or DDP still hold a group; ended
    during interpreter shutdown, one that still drops a collective's tensors takes the GIL and aborts the rank
    ("terminate called without an active exception": CI, under load). Under --cp 2 (the world, dp and cp groups,
    DDP) no native thread is left once main() returns, on either rank."""
    script = tmp_path / "threads_left.py"
    script.write_text(THREADS_LEFT)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script),
               *micro_args(tmp_path, "--cp", "2")]
    done = subprocess.run(command, capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("native threads left: 0") == 2, done.stdout
