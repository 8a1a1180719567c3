"""Stop signals end a run after the step in progress with a checkpoint, and ``--resume auto`` continues it
bit for bit: SIGTERM, SIGINT and SIGUSR1 at a random step, SIGKILL losing only the steps since the last
checkpoint (issue 11, items 2-4). The same under torchrun is in test_train_ddp.py."""
import random
import signal
import threading

import pytest

from helpers import new_seed, one_thread  # noqa: F401  (fixture used by pytestmark)
from train_helpers import (MICRO, assert_same_tensors, checkpoint, checkpoint_steps, complete_lines, make_trainer,
                          metrics_rows, parameters, run_main, run_upo_train, start_upo_train, wait_for_rows,
                          without_timing)
from upo.train.errors import RunStopped

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS, SAVE_EVERY = 16, 5
ARGS = ["--model-config", MICRO, "--max-examples", "16", "--batch-size", "4", "--grad-accum", "2", "--max-steps",
        str(STEPS), "--eval-fraction", "0.25", "--eval-every", "3", "--save-every", str(SAVE_EVERY), "--lr-scheduler",
        "linear", "--warmup-steps", "2", "--backend", "torch", "--device", "cpu", "--no-progress"]


def _signal_during_training_forward(trainer, signum: int, call: int) -> None:
    """Send ``signum`` to this process inside the ``call``-th training forward (mid-step: the data
    position has already moved on to this micro-batch)."""
    import os

    forward, calls = trainer.model.forward, [0]

    def forward_then_signal(batch):
        if trainer.model.training:
            calls[0] += 1
            if calls[0] == call:
                os.kill(os.getpid(), signum)
        return forward(batch)

    trainer.model.forward = forward_then_signal


def test_a_signal_mid_step_finishes_the_step_and_resumes_exactly(tmp_path):
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals reach the main thread only")
    settings = dict(max_steps=6, grad_accum=2, batch_size=2, eval_fraction=0.25, eval_every=2, save_every=100,
                    lr_scheduler="linear", warmup_steps=1)
    reference = make_trainer(tmp_path / "reference", **settings)
    reference.train()

    first = make_trainer(tmp_path, **settings)
    _signal_during_training_forward(first, signal.SIGINT, call=5)  # first micro-batch of step 3
    with pytest.raises(RunStopped, match="stopped by SIGINT after step 3 of 6") as stopped:
        first.train()
    assert stopped.value.exit_code == 130
    assert checkpoint_steps(tmp_path / "out") == [3]

    second = make_trainer(tmp_path, resume="auto", **settings)
    _signal_during_training_forward(second, signal.SIGUSR1, call=4)  # second micro-batch of step 5
    with pytest.raises(RunStopped, match="stopped by SIGUSR1 after step 5 of 6") as stopped:
        second.train()
    assert stopped.value.exit_code == 138

    last = make_trainer(tmp_path, resume="auto", **settings)
    last.train()
    assert_same_tensors(parameters(reference), parameters(last), "resumed twice vs uninterrupted")
    expected = without_timing(metrics_rows(tmp_path / "reference" / "out"))
    assert without_timing(metrics_rows(tmp_path / "out")) == expected


def _stop(process, signum: int, expected_code: int, out, seed) -> int:
    """Signal a running upo-train, check its one-line report and its checkpoint; returns the step it saved."""
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    name = signal.Signals(signum).name
    assert process.returncode == expected_code, (seed, err[-3000:])
    assert "Traceback" not in err, (seed, err)
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"upo-train: stopped by {name} after step "), (seed, last)
    step = int(last.split(" after step ")[1].split()[0])
    assert last == (f"upo-train: stopped by {name} after step {step} of {STEPS}: checkpoint "
                    f"{out}/checkpoints/checkpoint-{step:06d}.pt written; continue with --resume auto"), seed
    assert f"upo-train: {name} received: stopping after this step" in err, seed
    rows = metrics_rows(out)
    assert [r["step"] for r in rows] == list(range(1, step + 1)), seed  # no half line, no step beyond it
    assert checkpoint(out, step)["step"] == step
    return step


@pytest.mark.slow
def test_sigterm_sigint_and_sigkill_at_random_steps_then_resume_equals_the_uninterrupted_run(tmp_path, capsys):
    seed = new_seed()
    rng = random.Random(seed)
    reference = run_upo_train([*ARGS, "--output-dir", str(tmp_path / "reference")])
    assert reference.returncode == 0, reference.stderr[-3000:]
    out = tmp_path / "run"
    args = [*ARGS, "--output-dir", str(out)]

    process = start_upo_train(args)
    wait_for_rows(process, out / "metrics.jsonl", rng.randint(1, 3))
    # A second run into the same dir while the first is alive is refused (the lock), and changes nothing.
    code, _, err = run_main(args, capsys)
    assert code == 2 and f"is in use by another upo-train run (pid {process.pid} " in err, (seed, err)
    stopped = _stop(process, signal.SIGTERM, 143, out, seed)

    process = start_upo_train([*args, "--resume", "auto"])
    wait_for_rows(process, out / "metrics.jsonl", stopped + rng.randint(1, 3))
    stopped = _stop(process, signal.SIGINT, 130, out, seed)

    process = start_upo_train([*args, "--resume", "auto"])
    wait_for_rows(process, out / "metrics.jsonl", stopped + rng.randint(1, 3))
    process.kill()
    process.communicate(timeout=60)
    logged, saved = complete_lines(out / "metrics.jsonl"), max(checkpoint_steps(out))
    assert 0 <= logged - saved <= SAVE_EVERY, (seed, logged, saved)  # lost at most the steps since a checkpoint
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": ')  # as if killed in the middle of a line

    resumed = run_upo_train([*args, "--resume", "auto"])
    assert resumed.returncode == 0, (seed, resumed.stderr[-3000:])
    assert f"resumed from {out}/checkpoints/checkpoint-{saved:06d}.pt at step {saved}" in resumed.stderr
    assert_same_tensors(checkpoint(tmp_path / "reference", STEPS)["model"], checkpoint(out, STEPS)["model"],
                        f"interrupted three times vs uninterrupted (seed {seed})")
    assert without_timing(metrics_rows(out)) == without_timing(metrics_rows(tmp_path / "reference")), seed
