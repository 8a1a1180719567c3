"""Which reference a run compares against, fixed from the *initial* policy (before a checkpoint is
loaded): a frozen copy, the policy with its LoRA adapters off, a separate ``--ref-model``, log-probs
cached on disk (``--precompute-ref``), or none (reference-free losses)."""
from __future__ import annotations

from torch import nn

from upo.heads import describe_lm_head
from upo.train.kto_pairs import kl_reference_of_run
from upo.train.models import add_lora, enable_activation_checkpointing, frozen_copy
from upo.train.objective import needs_reference
from upo.train.reference import load_or_compute_reference, reference_batches


def prepare_reference(trainer, policy: nn.Module) -> tuple[nn.Module, nn.Module | str | None]:
    """Fix the trainer's reference, then add LoRA (and activation checkpointing) to the policy.

    Returns the policy and the reference: a frozen copy, ``"adapters"`` (LoRA disabled),
    ``"precomputed"`` (log-probs cached in ``trainer.ref_logps``) or None (reference-free losses).
    """
    config = trainer.config
    trainer.ref_logps = None
    reference: nn.Module | str | None = None
    if not needs_reference(config.loss_type):
        if config.precompute_ref:
            trainer.log("note: --precompute-ref is ignored: the selected losses use no reference")
        if config.ref_model:
            trainer.log("note: --ref-model is ignored: the selected losses use no reference")
    elif config.precompute_ref:
        source = trainer._load_reference(policy) if config.ref_model else policy
        batches = reference_batches(trainer.sampler, trainer.eval_indices, trainer.mismatched, len(trainer.data))
        trainer.ref_logps = load_or_compute_reference(source, trainer.data, batches, trainer.pad_id, config,
                                                      trainer.runtime, trainer.autocast_dtype, trainer.log)
        if trainer.mismatched:
            trainer.ref_logps["kl"] = kl_reference_of_run(trainer, policy)
        reference = "precomputed"
    elif config.ref_model:
        reference = trainer._load_reference(policy)
    elif config.lora:
        reference = "adapters"
    else:
        reference = frozen_copy(policy)
        describe_lm_head(reference)  # read once here, as the policy's (a copy: same numbers, no check)
    if config.gradient_checkpointing:
        enable_activation_checkpointing(policy)
    if config.lora:
        policy = add_lora(policy, config)
    return policy, reference
