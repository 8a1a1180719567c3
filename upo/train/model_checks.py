"""Start-up check of the models a run trains with: their logits.

Every model is read through ``upo.heads`` (hidden states the LM head consumes + the head's description);
before anything trains, the logit-free log-probs are compared with the model's own
``log_softmax(logits)`` on a slice of the first pair (``upo.heads.check_lm_head``, well under a second).
A disagreement is one line (exit 2) naming the model type, the size and ``--no-logit-check``.
"""
from __future__ import annotations

import time

from torch import nn

from upo.heads import LogitCheckError, check_lm_head, describe_lm_head
from upo.heads.check import ROWS, TOKENS
from upo.train.config import TrainConfig
from upo.train.data import collate
from upo.train.errors import UserError
from upo.train.runtime import Runtime


def check_logits(model: nn.Module, what: str, examples: list, pad_id: int, config: TrainConfig,
                 runtime: Runtime) -> str:
    """The model's logit-free log-probs equal its own on ``examples`` (a pair), or a :class:`UserError`.
    Returns the line that says so, for the run's description."""
    head = describe_lm_head(model)
    if not config.logit_check:
        return f"note: --no-logit-check: {what} ({head.summary}) is used without the logit check"
    batch = collate(examples, pad_id, packing=False).to(runtime.device)
    started = time.perf_counter()
    try:
        error = check_lm_head(model, batch.input_ids, batch.attention_mask, backend=config.backend)
    except LogitCheckError as err:
        raise UserError(
            f"{what}: {err.model_type}: upo's logit-free log-probs disagree with the model's own "
            f"log_softmax(logits) (max |d log p| = {err.max_error:.3g} > {err.tolerance:.3g} on {ROWS}x{TOKENS} "
            "tokens of the first pair), so training would use wrong numbers; please report this model type. "
            "--no-logit-check skips the check if you know its logits are not what it should train on",
            reported_by_main=not runtime.is_main) from None
    return (f"logit check: {head.summary}: agrees with its own logits (max |d log p| {error:.1e}, "
            f"{time.perf_counter() - started:.2f} s)")

