"""A non-finite loss or gradient is never applied: the run stops with one line naming the step and the
batch's rows and keeps the last good checkpoint, or skips a bounded number of batches (issue 11, item 6)."""
import dataclasses
import json

import pytest
import torch

from helpers import one_thread  # noqa: F401  (fixture used by pytestmark)
from train_helpers import assert_one_line_error, checkpoint_steps, make_trainer, micro_args, parameters, run_main
from upo.train.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_diverging_run_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    # lr 1e30: step 1 is finite, its update overflows the activations of step 2.
    args = micro_args(tmp_path, "--lr", "1e30", "--warmup-steps", "0", "--max-steps", "4", "--save-every", "1")
    code, _, err = run_main(args, capsys)
    out = tmp_path / "out"
    assert_one_line_error(code, err, "step 2: non-finite log-probs", "on the batch of ", "preferences.jsonl lines ",
                          f"the last good checkpoint is {out}/checkpoints/checkpoint-000001.pt",
                          "--max-skipped-batches", alone=False)
    assert checkpoint_steps(out) == [1]
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]
    assert not (out / "summary.json").exists() and not (out / "model").exists()


def poison(trainer, nan_loss: set[int] = frozenset(), diverged: set[int] = frozenset()):
    """On the given forward calls (0-based) of the trainer's model: a NaN loss, or the library's refusal of
    non-finite activations."""
    forward, calls = trainer.model.forward, [0]

    def poisoned(batch):
        call, calls[0] = calls[0], calls[0] + 1
        if call in diverged:
            raise ValueError("non-finite log-probs: hidden contain NaN or inf")
        out = forward(batch)
        return dataclasses.replace(out, loss=out.loss * float("nan")) if call in nan_loss else out

    trainer.model.forward = poisoned


def test_bounded_skipping_of_non_finite_batches(tmp_path):
    with make_trainer(tmp_path, max_skipped_batches=2, max_steps=3, grad_accum=3, batch_size=2,
                      max_examples=40) as trainer:
        # Step 2: a NaN loss in its first micro-batch, then (next batch) diverged activations; step 3: NaN.
        poison(trainer, nan_loss={3, 10}, diverged={6})
        assert trainer.train_step() is not None
        before = parameters(trainer)
        for skipped in (1, 2):
            position = trainer.state.position
            assert trainer.train_step() is None  # skipped: no update, same step
            assert trainer.state.position.index == position.index + 6  # every micro-batch of it consumed
            assert trainer.state.step == 1 and trainer.summary()["skipped_batches"] == skipped
        after = parameters(trainer)
        assert all(torch.equal(before[name], after[name]) for name in before)
        assert trainer.train_step()["step"] == 2  # the skipped NaN gradients are gone
        assert trainer.save_checkpoint() is not None
        assert torch.load(trainer.last_checkpoint[1], weights_only=False)["skipped_batches"] == 2
        with pytest.raises(UserError, match=r"step 3: non-finite loss \(nan\) on the batch of .*lines .* after "
                                            r"skipping 2 batch\(es\); stopped without applying it"):
            trainer.train_step()


def test_a_non_finite_gradient_with_a_finite_loss_stops_the_run(tmp_path):
    with make_trainer(tmp_path) as trainer:
        weight = next(p for p in trainer.module.parameters() if p.requires_grad)
        weight.register_hook(lambda grad: grad * float("inf"))
        with pytest.raises(UserError, match=r"step 1: non-finite gradient norm \((inf|nan)\).*no checkpoint was "
                                            "written yet"):
            trainer.train_step()
