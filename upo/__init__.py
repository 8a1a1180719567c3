"""upo: preference alignment losses (DPO family + UPO) over fused, logit-free kernels.

User API::

    upo.loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, ...)
    upo.unpaired_loss(policy_logps, ref_logps, desirable, lengths=..., ...)   # KTO's unpaired rows (kto, upo)
    upo.kto_reference_point(kl_policy_logps, kl_ref_logps)                  # KTO's z from mismatched pairs
    upo.fused_loss(hidden, weight, labels, ...)      # straight from hidden states + LM head
    upo.sequence_logprobs(hidden, weight, labels)    # per-sequence sums (use under no_grad for a reference)
    upo.available_losses()
    upo.loss_spec(name)                              # a loss's LossSpec: needs_reference, options, ...
    upo.ValueHead(hidden_size)
    upo.causal_lm_logprobs(model, input_ids, labels=None, *, attention_mask=None, position_ids=None,
                           backend="auto", check=True)  # a HF causal LM's own log-probs, no logits formed
    upo.load_pretrained(name, dtype)                 # (model, tokenizer): a folder, hub id, .gguf file or "smollm2"

The library (this package minus ``upo.train``) never imports the training application;
``upo.train`` is the ``upo-train`` command built on it. Map of the code: docs/layout.md.
"""
from upo.fused import fused_loss, sequence_logprobs
from upo.heads import causal_lm_logprobs
from upo.pretrained import load_pretrained
from upo.losses import (LossOutput, available_losses, kto_reference_point, loss, loss_spec, register_loss,
                        unpaired_loss, unpaired_losses)
from upo.value_head import ValueHead

__all__ = [
    "LossOutput",
    "ValueHead",
    "available_losses",
    "causal_lm_logprobs",
    "fused_loss",
    "kto_reference_point",
    "load_pretrained",
    "loss",
    "loss_spec",
    "register_loss",
    "sequence_logprobs",
    "unpaired_loss",
    "unpaired_losses",
]
__version__ = "0.1.0"
