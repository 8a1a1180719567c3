"""Non-finite losses and gradients: never applied. The run stops naming the step and the batch's rows,
keeping the last good checkpoint, or (``--max-skipped-batches N``) skips up to N such batches."""
from __future__ import annotations

import math

from upo.train.errors import UserError


def is_non_finite_error(err: ValueError) -> bool:
    """``upo.fused_loss`` and ``upo.loss`` refuse NaN/inf inputs (diverged weights or activations)
    with a ValueError that says so; any other ValueError is a bug and propagates."""
    text = str(err)
    return "NaN or inf" in text or "non-finite" in text


def non_finite_problem(losses: list[float], grad_norm: float, forward_error: str | None) -> str | None:
    """What is wrong with a step's numbers, in words (None: all finite)."""
    if forward_error is not None:
        return forward_error
    bad = [value for value in losses if not math.isfinite(value)]
    if bad:
        return f"non-finite loss ({bad[0]})"
    if not math.isfinite(grad_norm):
        return f"non-finite gradient norm ({grad_norm})"
    return None


class DivergenceGuard:
    """Counts the skipped batches (saved in checkpoints, reported in summary.json) against the budget."""

    def __init__(self, max_skipped: int, log):
        self.max_skipped = max_skipped
        self.skipped = 0
        self._log = log

    def handle(self, step: int, problem: str, rows: str, last_checkpoint) -> None:
        """A non-finite step: count it as skipped (no update), or raise the one-line error."""
        if self.skipped < self.max_skipped:
            self.skipped += 1
            self._log(f"note: step {step}: {problem} on the batch of {rows}; skipped it without an update "
                      f"({self.skipped} of --max-skipped-batches {self.max_skipped})")
            return
        kept = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written yet"
        skipped = f" after skipping {self.skipped} batch(es)" if self.skipped else ""
        raise UserError(f"step {step}: {problem} on the batch of {rows}{skipped}; stopped without applying it "
                        f"({kept}); lower --lr, check those rows, or allow skipping with --max-skipped-batches N")
