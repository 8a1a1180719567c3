"""Start-up checks of the models a run trains with: their logits, and a ``--ref-model``'s fit with the policy.

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
from upo.shared_prompt import check_masked_attention, check_split_attention
from upo.train.config import TrainConfig
from upo.train.data import collate
from upo.train.errors import UserError
from upo.train.models import check_same_tokenizer, load_reference_model
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


def load_checked_reference(policy: nn.Module, tokenizer, config: TrainConfig, runtime: Runtime,
                           check) -> nn.Module:
    """``--ref-model``: loaded as the policy was, same tokenizer, ``check(model, what)``-ed like it; it must
    share the policy's fused pass (hidden size, soft cap) unless its log-probs are precomputed."""
    reference, ref_tokenizer = load_reference_model(config, runtime.device)
    head, policy_head = describe_lm_head(reference), describe_lm_head(policy)
    check_same_tokenizer(tokenizer, ref_tokenizer, head.vocab_size, config.ref_model)
    check(reference, f"--ref-model {config.ref_model}")
    if config.precompute_ref:
        return reference
    for what, ours, theirs in (("hidden size", head.hidden_size, policy_head.hidden_size),
                               ("logit soft cap", head.logit_map.softcap, policy_head.logit_map.softcap)):
        if ours != theirs:
            raise UserError(f"--ref-model {config.ref_model}: its {what} ({ours}) differs from the policy's "
                            f"({theirs}), so they cannot share a fused pass; add --precompute-ref")
    return reference


def check_attention(config: TrainConfig, *models) -> None:
    """The attention of every model a batch goes through (the policy, a reference model): ``--share-prompt`` runs
    a 4-D attention mask, which it must honour; ``--cp`` runs SDPA over gathered keys and values."""
    for flag, wanted, check in (("--share-prompt", config.share_prompt, check_masked_attention),
                                ("--cp", config.cp > 1, check_split_attention)):
        try:
            if wanted:
                check(*models)
        except ValueError as err:
            raise UserError(f"{flag}: {err}") from None
