"""The process's allocator (upo/train/allocator.py): the libraries found by their file names, the environment of
the restart, and ``upo-train`` (alone and under torchrun) and ``upo-frontier`` restarting in place on a preloaded
library: the same PID running the same command line, so that SIGTERM and SIGINT reach the training process and
its exit status is the command's; the opt-outs; the note, or the error, when none is found.

The library preloaded here is a copy of the C math library named as tcmalloc's, in a folder handed over by
``UPO_ALLOCATOR_PATH``: these tests mean the same with or without tcmalloc or jemalloc on the machine. One test,
skipped without one, checks that a real library's ``malloc`` becomes the process's."""
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from train_helpers import (MICRO, checkpoint, metrics_rows, subprocess_env, upo_train_command, wait_for_rows)
from upo.train import allocator
from upo.train.allocator import PRELOADED_ENV, find_library, preload_environment, use_allocator
from upo.train.cli import parse_command
from upo.train.errors import UserError

linux_only = pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
FAKE = "libtcmalloc_minimal.so.4"
STEPS = 1000  # far more than any test waits for: each run here ends by a signal or --max-steps
ARGS = ["--model-config", MICRO, "--max-examples", "16", "--batch-size", "4", "--eval-fraction", "0", "--save-every",
        str(STEPS), "--backend", "torch", "--device", "cpu", "--no-progress"]


def _mapped_libm() -> str:
    for path in allocator._mapped_libraries():
        if os.path.basename(path).startswith(("libm.so", "libm-")):
            return path
    pytest.skip("no libm mapped in this process")


@pytest.fixture
def dirs(tmp_path):
    """``lib``: a folder holding a preloadable stand-in for tcmalloc; ``empty``: a folder holding none."""
    lib, empty = tmp_path / "lib", tmp_path / "empty"
    lib.mkdir()
    empty.mkdir()
    shutil.copyfile(_mapped_libm(), lib / FAKE)
    return lib, empty


def _env(search: Path, **extra) -> dict:
    env = subprocess_env()
    for name in ("LD_PRELOAD", allocator.CHOICE_ENV, PRELOADED_ENV):
        env.pop(name, None)  # the restart is the only preload: a test run under one would skip it
    return {**env, allocator.PATH_ENV: str(search), **extra}


@contextlib.contextmanager
def _started(command: list[str], env: dict):
    """A running command; one a failed check left running is stopped (torchrun passes SIGTERM on to its ranks)."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                process.kill()
                process.communicate()


def _start_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("upo-train: tiny byte-level Llama")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


# ---- in this process: the search, the environment, the decision ----------------------------------------------
def test_finds_each_library_by_its_file_names_first_folder_first(tmp_path, monkeypatch):
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    (first / "libtcmalloc_minimal_debug.so.4").write_bytes(b"")  # gperftools' debug build: not an allocator to use
    (first / "libjemalloc.so.2").write_bytes(b"")
    (second / "libtcmalloc_minimal.so.4").write_bytes(b"")
    (second / "libjemalloc.so").write_bytes(b"")
    monkeypatch.setenv(allocator.PATH_ENV, f"{first}:{second}")
    assert allocator.search_dirs() == [str(first), str(second)]
    assert find_library("tcmalloc") == str(second / "libtcmalloc_minimal.so.4")
    assert find_library("jemalloc") == str(first / "libjemalloc.so.2")
    assert find_library("tcmalloc", [str(first)]) is None


def test_the_restarts_environment_puts_the_library_first_and_keeps_the_users_settings():
    env = {"LD_PRELOAD": "/opt/libfoo.so:/usr/lib/libjemalloc.so.2", "PATH": "/bin"}
    tc = preload_environment("tcmalloc", "/x/libtcmalloc.so.4", env)
    assert tc["LD_PRELOAD"] == "/x/libtcmalloc.so.4:/opt/libfoo.so"  # the other allocator goes, the rest stays
    assert tc["PATH"] == "/bin" and "MALLOC_CONF" not in tc and int(tc["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]) > 2**39
    je = preload_environment("jemalloc", "/x/libjemalloc.so.2", {"MALLOC_CONF": "narenas:1"})
    assert je == {"LD_PRELOAD": "/x/libjemalloc.so.2", "MALLOC_CONF": "narenas:1"}
    assert preload_environment("jemalloc", "/j.so", {})["MALLOC_CONF"] == allocator.JEMALLOC_CONF
    assert env["LD_PRELOAD"] == "/opt/libfoo.so:/usr/lib/libjemalloc.so.2"  # not changed in place


class _Restarted(Exception):
    pass


def _execve(path, argv, env):
    raise _Restarted(path, argv, env)


@linux_only
def test_the_restart_runs_the_same_command_line_with_the_library_preloaded(dirs, monkeypatch):
    lib, empty = dirs
    monkeypatch.setattr(allocator, "_mapped_libraries", lambda: [])  # as if this process ran on the system's
    monkeypatch.setenv(allocator.PATH_ENV, str(lib))
    monkeypatch.delenv(allocator.CHOICE_ENV, raising=False)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    for setting, on_cpu in ((None, True), ("auto", True), ("tcmalloc", False)):  # asked by name: on a GPU run too
        with pytest.raises(_Restarted) as restart:
            use_allocator(setting, on_cpu, execve=_execve)
        path, argv, env = restart.value.args
        assert path == sys.executable and argv == sys.orig_argv
        assert env["LD_PRELOAD"] == str(lib / FAKE) and env[PRELOADED_ENV] == str(lib / FAKE)
    assert use_allocator("auto", False, execve=_execve) == (allocator.allocator_in_use(), None)  # a GPU run's host
    assert use_allocator("system", True, execve=_execve) == (allocator.allocator_in_use(), None)
    monkeypatch.setenv(allocator.CHOICE_ENV, "system")
    assert use_allocator(None, True, execve=_execve)[1] is None
    with pytest.raises(_Restarted):  # the flag wins over the environment
        use_allocator("tcmalloc", True, execve=_execve)
    monkeypatch.setenv(allocator.CHOICE_ENV, "tcmaloc")
    with pytest.raises(UserError, match="UPO_ALLOCATOR=tcmaloc: use one of auto, system, tcmalloc, jemalloc"):
        use_allocator(None, True, execve=_execve)

    monkeypatch.delenv(allocator.CHOICE_ENV)
    monkeypatch.setenv(allocator.PATH_ENV, str(empty))
    in_use, note = use_allocator("auto", True, execve=_execve)
    assert in_use.name == "system" and "apt-get install libtcmalloc-minimal4" in note and "\n" not in note
    with pytest.raises(UserError, match="--allocator jemalloc: no libjemalloc in .*apt-get install libjemalloc2"):
        use_allocator("jemalloc", True, execve=_execve)


@linux_only
def test_a_preload_that_did_not_take_is_said_once_and_not_tried_again(monkeypatch, dirs):
    lib, _ = dirs
    monkeypatch.setattr(allocator, "_mapped_libraries", lambda: [])
    monkeypatch.setenv(allocator.PATH_ENV, str(lib))
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.setenv(PRELOADED_ENV, str(lib / FAKE))  # as in the restarted process, but the library is not mapped
    in_use, note = use_allocator("auto", True, execve=_execve)
    assert in_use.name == "system" and f"{lib / FAKE} could not be preloaded" in note
    assert PRELOADED_ENV not in os.environ  # the next upo-train this process starts searches afresh
    monkeypatch.setenv(PRELOADED_ENV, str(lib / FAKE))
    with pytest.raises(UserError, match="--allocator tcmalloc: .* could not be preloaded"):
        use_allocator("tcmalloc", True, execve=_execve)


def test_allocator_comes_from_the_flag_or_the_config_file_and_is_not_a_run_setting(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("allocator: system\nlr: 0.01\n")
    assert parse_command(["--config", str(config)])[1] == "system"
    run, chosen = parse_command(["--config", str(config), "--allocator", "jemalloc"])
    assert chosen == "jemalloc" and run.lr == 0.01 and "allocator" not in run.to_dict()
    assert parse_command([])[1] is None
    with pytest.raises(UserError, match="--allocator: invalid choice: 'glibc'"):
        parse_command(["--allocator", "glibc"])


# ---- upo-train as a command: restarted in place ---------------------------------------------------------------
@linux_only
@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_upo_train_restarts_in_place_and_signals_flags_and_exit_status_reach_the_run(dirs, tmp_path, signum, code):
    lib, _ = dirs
    out = tmp_path / "out"
    command = upo_train_command([*ARGS, "--max-steps", str(STEPS), "--output-dir", str(out)])
    with _started(command, _env(lib)) as process:
        wait_for_rows(process, out / "metrics.jsonl", 2)
        # The process the launcher started is the one training, with the library mapped and the same command line.
        assert str(lib / FAKE) in Path(f"/proc/{process.pid}/maps").read_text()
        assert Path(f"/proc/{process.pid}/cmdline").read_bytes().split(b"\0")[1:-1] == [a.encode() for a in command[1:]]
        process.send_signal(signum)
        _, err = process.communicate(timeout=120)
    assert process.returncode == code, err[-3000:]
    assert f"memory allocator tcmalloc ({FAKE})" in _start_line(err) and "note:" not in err
    last = err.strip().splitlines()[-1]
    step = int(last.split(" after step ")[1].split()[0])
    assert last.startswith(f"upo-train: stopped by {signal.Signals(signum).name} after step {step} of {STEPS}: ")
    assert checkpoint(out, step)["step"] == step and len(metrics_rows(out)) == step


@linux_only
def test_a_mistake_found_after_the_restart_is_one_line_with_status_2(dirs, tmp_path):
    lib, _ = dirs
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "a", "chosen": "b"}) + "\n")
    done = subprocess.run(upo_train_command([*ARGS, "--dataset", str(data), "--output-dir", str(tmp_path / "out")]),
                          capture_output=True, text=True, env=_env(lib), timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("upo-train: error: dataset is missing column(s) rejected"), lines


@linux_only
@pytest.mark.parametrize("opt_out", ["environment", "flag"])
def test_opting_out_keeps_the_system_allocator_without_a_note(dirs, tmp_path, opt_out):
    lib, _ = dirs
    flags = ["--allocator", "system"] if opt_out == "flag" else []
    env = _env(lib, **({allocator.CHOICE_ENV: "system"} if opt_out == "environment" else {}))
    done = subprocess.run(upo_train_command([*ARGS, *flags, "--max-steps", "1", "--output-dir", str(tmp_path / "o")]),
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "tcmalloc" not in _start_line(done.stderr) and "memory allocator" in _start_line(done.stderr)
    assert "note:" not in done.stderr


@linux_only
def test_without_a_library_the_run_says_once_how_to_install_one(dirs, tmp_path):
    _, empty = dirs
    done = subprocess.run(upo_train_command([*ARGS, "--max-steps", "2", "--output-dir", str(tmp_path / "out")]),
                          capture_output=True, text=True, env=_env(empty), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    notes = [line for line in done.stderr.splitlines() if "install one" in line]
    assert len(notes) == 1 and notes[0].startswith("upo-train: note: no tcmalloc or jemalloc"), done.stderr
    assert "apt-get install libtcmalloc-minimal4" in notes[0] and "conda" in notes[0]

    named = subprocess.run(upo_train_command([*ARGS, "--allocator", "tcmalloc", "--output-dir", str(tmp_path / "o")]),
                           capture_output=True, text=True, env=_env(empty), timeout=300)
    assert named.returncode == 2
    assert named.stderr.strip().splitlines() == [named.stderr.strip()]
    assert named.stderr.startswith(f"upo-train: error: --allocator tcmalloc: no libtcmalloc in {empty}; install it "
                                   "with `apt-get install libtcmalloc-minimal4`")


@linux_only
@pytest.mark.slow
@pytest.mark.xdist_group("torchrun")
def test_under_torchrun_every_rank_restarts_on_the_library(dirs, tmp_path):
    lib, _ = dirs
    out = tmp_path / "out"
    with _started(upo_train_command([*ARGS, "--max-steps", str(STEPS), "--output-dir", str(out)], 2), _env(lib)) \
            as process:
        wait_for_rows(process, out / "metrics.jsonl", 1)
        workers = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
        assert len(workers) == 2
        for pid in workers:  # torchrun's own children: each restarted itself in place
            assert str(lib / FAKE) in Path(f"/proc/{pid}/maps").read_text()
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=120)
    assert len([line for line in err.splitlines() if line.startswith("upo-train: stopped by SIGTERM")]) == 1, err
    assert f"memory allocator tcmalloc ({FAKE})" in _start_line(err)


@linux_only
def test_upo_frontier_restarts_in_place_and_stops_on_sigterm(dirs, tmp_path):
    lib, empty = dirs
    command = [sys.executable, "-m", "upo.frontier", "--output-dir", str(tmp_path / "grid"), "--steps", "500",
               "--max-examples", "24", "--bases", "sigmoid", "--lambdas", "0", "--methods", "upo", "--no-progress",
               "--", *ARGS[:2], "--batch-size", "4", "--backend", "torch", "--device", "cpu"]
    with _started(command, _env(lib)) as process:
        for line in process.stderr:  # the start line comes before the first run
            if line.startswith("upo-frontier: ") and "runs x" in line:
                break
        assert line.rstrip().endswith(f"; memory allocator tcmalloc ({FAKE})"), line
        assert str(lib / FAKE) in Path(f"/proc/{process.pid}/maps").read_text()
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=120)
    assert process.returncode == 143 and "stopped by a signal before the grid finished" in err, err[-3000:]

    named = subprocess.run([*command[:3], "--allocator", "jemalloc"], capture_output=True, text=True,
                           env=_env(empty), timeout=300)
    assert named.returncode == 2
    assert named.stderr.startswith("upo-frontier: error: --allocator jemalloc: no libjemalloc")
    assert len(named.stderr.strip().splitlines()) == 1


# Run as `python -c`: restarted on the system's library, the file that `malloc` resolves to, by dladdr.
MALLOC_FROM = """
import ctypes, os
from upo.train.allocator import allocator_in_use, use_allocator
use_allocator(None, True)

class Info(ctypes.Structure):
    _fields_ = [("fname", ctypes.c_char_p), ("fbase", ctypes.c_void_p), ("sname", ctypes.c_char_p),
                ("saddr", ctypes.c_void_p)]

process, info = ctypes.CDLL(None), Info()
assert process.dladdr(ctypes.cast(process.malloc, ctypes.c_void_p), ctypes.byref(info))
print(allocator_in_use().path, os.path.realpath(info.fname.decode()))
"""


@linux_only
@pytest.mark.skipif(not any(find_library(name) for name in allocator.LIBRARIES),
                    reason="no tcmalloc or jemalloc on this machine")
def test_a_real_librarys_malloc_becomes_the_processs():
    unset = ("LD_PRELOAD", allocator.CHOICE_ENV, allocator.PATH_ENV)
    env = {k: v for k, v in subprocess_env().items() if k not in unset}
    done = subprocess.run([sys.executable, "-c", MALLOC_FROM], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    in_use, malloc_from = done.stdout.split()
    assert os.path.basename(in_use).startswith(("libtcmalloc", "libjemalloc")) and malloc_from == in_use
