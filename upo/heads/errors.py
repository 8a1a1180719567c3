"""The refusals of ``upo.heads``: a model the fused path cannot reproduce, and a failed logit check."""
from __future__ import annotations

from torch import nn


class UnsupportedModelError(ValueError):
    """A model whose LM head the fused path cannot reproduce; the message names the model type and why."""


class LogitCheckError(UnsupportedModelError):
    """The fused log-probs disagree with the model's own ``log_softmax(logits)`` on a small slice.

    ``model_type``, ``max_error`` and ``tolerance`` say by how much; callers add how to turn the check off.
    """

    def __init__(self, model_type: str, max_error: float, tolerance: float, detail: str = ""):
        self.model_type, self.max_error, self.tolerance = model_type, max_error, tolerance
        super().__init__(
            f"{model_type}: upo's logit-free log-probs disagree with the model's own log_softmax(logits) "
            f"(max |d log p| = {max_error:.3g} > tolerance {tolerance:.3g}{detail}); training on them would "
            "train on wrong numbers. Please report the model type to upo; if you know the model's logits are "
            "not what it trains on, turn this check off")


def unwrap(model: nn.Module) -> nn.Module:
    """A PEFT ``PeftModel`` -> the transformers model inside it (its adapter layers stay in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def model_name(model: nn.Module) -> str:
    """``granite (GraniteForCausalLM)``: the config's model type and the class, for messages."""
    base = unwrap(model)
    model_type = getattr(getattr(base, "config", None), "model_type", None) or "model"
    return f"{model_type} ({type(base).__name__})"
