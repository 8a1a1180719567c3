"""Reading a Hugging Face causal LM as "backbone + LM head": final hidden states, head weight, logit options.

The loss never calls the LM head: it runs the backbone for the final hidden states and hands
them, with the head's weight and bias, to the fused kernels.
"""
from __future__ import annotations

import torch
from torch import nn


class UnsupportedModelError(ValueError):
    """A model whose LM head the fused path cannot reproduce; the message names the model type."""


def backbone_of(causal_lm: nn.Module) -> nn.Module:
    """The decoder stack without the LM head (also through a PEFT wrapper)."""
    base = causal_lm.get_base_model() if hasattr(causal_lm, "get_base_model") else causal_lm
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    if decoder is None or decoder is base:
        decoder = getattr(base, "model", None)
    if decoder is None:
        raise UnsupportedModelError(f"cannot find the backbone of {type(base).__name__} (no .model / get_decoder())")
    return decoder


def lm_head_of(causal_lm: nn.Module) -> nn.Module:
    base = causal_lm.get_base_model() if hasattr(causal_lm, "get_base_model") else causal_lm
    head = base.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise UnsupportedModelError(f"{type(base).__name__} has no linear LM head")
    return head


def logit_options(causal_lm: nn.Module) -> dict:
    """Logit scaling/soft-capping some architectures apply after the LM head (Cohere, Gemma 2)."""
    base = causal_lm.get_base_model() if hasattr(causal_lm, "get_base_model") else causal_lm
    cfg = base.config
    return {"logit_scale": float(getattr(cfg, "logit_scale", None) or 1.0),
            "softcap": getattr(cfg, "final_logit_softcapping", None)}


def final_hidden_states(causal_lm: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                        position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The backbone's last hidden states ``[B, T, D]``, the LM head's input (the head is never run)."""
    out = backbone_of(causal_lm)(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                  use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def head_weight_and_bias(head: nn.Module, dtype: torch.dtype):
    """LM-head weight/bias in the hidden states' dtype (bf16 autocast leaves them fp32)."""
    weight, bias = head.weight, getattr(head, "bias", None)
    if weight.dtype != dtype:
        weight = weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    return weight, bias
