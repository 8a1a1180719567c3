"""Running upo's loss code inside the causal LM's ``forward``.

DDP, FSDP and DeepSpeed only see (synchronise, gather) what runs inside the wrapped model's
``forward``. So, as TRL does for its fused LM head, the causal LM's ``forward`` is patched to
take one more keyword, ``upo_fn``: with it, the forward calls ``upo_fn(causal_lm, input_ids,
attention_mask)`` (which reads the final hidden states and the LM head itself) and returns its
result; without it, the forward is unchanged. The call goes through every wrapper: accelerate's,
PEFT's (which forwards unknown keywords to the base model) and TRL's own patch.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from torch import nn

_PATCHED = "_upo_forward_patched"


def causal_lm_of(model: nn.Module) -> nn.Module:
    """The causal LM inside accelerate / DDP / DeepSpeed wrappers and a PEFT model."""
    from accelerate.utils import extract_model_from_parallel

    model = extract_model_from_parallel(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def patch_forward(causal_lm: nn.Module) -> None:
    """Let ``causal_lm(..., upo_fn=fn)`` run ``fn`` inside its forward (idempotent)."""
    if getattr(causal_lm, _PATCHED, False):
        return
    original = causal_lm.forward

    @functools.wraps(original)  # keeps the signature that generate() checks its kwargs against
    def forward(*args, upo_fn: Callable | None = None, **kwargs):
        if upo_fn is None:
            return original(*args, **kwargs)
        if args:
            raise TypeError("the upo forward takes keyword arguments only")
        return upo_fn(causal_lm, kwargs["input_ids"], kwargs.get("attention_mask"))

    causal_lm.forward = forward
    setattr(causal_lm, _PATCHED, True)


def run_inside_forward(model: nn.Module, fn: Callable, input_ids, attention_mask) -> Any:
    """``fn(causal_lm, input_ids, attention_mask)`` run as ``model``'s forward (through its wrappers)."""
    patch_forward(causal_lm_of(model))
    return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, upo_fn=fn)
