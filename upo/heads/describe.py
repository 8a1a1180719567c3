"""A Hugging Face causal LM read as "hidden states the head consumes + a linear LM head description".

``describe_lm_head(model)`` is the one place that does it (the trainer, the reference pass, the TRL
integration and :func:`upo.causal_lm_logprobs` all call it). It is computed once per model and cached
on it; each step reads it:

    head = describe_lm_head(model)                 # cached; recomputed if the head module changed
    hidden = head.hidden_states(model, input_ids, attention_mask, position_ids)   # [B, T, D]
    weight, bias = head.weight_and_bias(hidden.dtype)                            # this step's, differentiable
    logp = upo_kernels.linear_logprobs(hidden, weight, labels, bias=bias, **head.logit_options)

so that ``softmax(cap(logit_scale * (hidden @ weight.T + bias)))`` is the model's own distribution.
The three parts: ``capture.py`` (hidden states: the model's forward with the head stubbed),
``weights.py``/``peft.py`` (the head's weight through any wrapper), ``probe.py`` (the map after the
head). ``check.py`` verifies a description against the model's own logits.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from upo.heads.capture import head_input
from upo.heads.errors import UnsupportedModelError, model_name, unwrap
from upo.heads.peft import adapter_key, peft_head_weights
from upo.heads.probe import LogitMap, probe_logit_map
from upo.heads.weights import HeadWeights, unwrapped_head_weights

_CACHE = "_upo_lm_head"


@dataclass(eq=False)
class LMHead:
    """How ``model``'s logits are formed: ``cap(logit_scale * (hidden @ W[:vocab].T + b[:vocab]))``."""

    name: str  # "granite (GraniteForCausalLM)"
    head: nn.Module  # get_output_embeddings(): the module whose input is captured
    weights: HeadWeights
    logit_map: LogitMap
    hidden_size: int
    vocab_size: int  # rows of weight_and_bias(): the model's logits per token
    key: tuple  # what the description depends on (the head module and its adapters)
    checked: bool = False  # check_lm_head passed on this model

    @property
    def logit_options(self) -> dict:
        return {"logit_scale": self.logit_map.logit_scale, "softcap": self.logit_map.softcap}

    @property
    def summary(self) -> str:
        m = self.logit_map
        parts = [f"head {self.weights.kind}"]
        if m.logit_scale != 1.0:
            parts.append(f"logit scale {m.logit_scale:.6g}")
        if m.softcap is not None:
            parts.append(f"softcap {m.softcap:.6g}")
        if m.vocab is not None:
            parts.append(f"first {m.vocab} logits")
        return f"{self.name}: " + ", ".join(parts)

    def hidden_states(self, model: nn.Module, input_ids: torch.Tensor, attention_mask=None,
                      position_ids=None, **forward_kwargs) -> torch.Tensor:
        """``[*input_ids.shape, D]``: the head's input in ``model``'s own forward (logits never formed);
        ``forward_kwargs`` go to the forward as they are (keywords its attention functions read)."""
        return head_input(unwrap(model), self.head, self.hidden_size, input_ids, attention_mask, position_ids,
                          **forward_kwargs)

    def weight_and_bias(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This step's ``(W [V, D], b [V] | None)``, cut to the logits the model keeps, cast to ``dtype``."""
        weight, bias = self.weights.read()
        vocab = self.logit_map.vocab
        if vocab is not None:
            weight, bias = weight[:vocab], None if bias is None else bias[:vocab]
        if dtype is not None and weight.dtype != dtype:
            weight = weight.to(dtype)
        if dtype is not None and bias is not None and bias.dtype != dtype:
            bias = bias.to(dtype)
        return weight, bias

    def weight_and_bias_for(self, logit_options: dict, dtype: torch.dtype | None = None):
        """``weight_and_bias`` for kernels that apply another head's ``logit_options`` (a reference model
        read with the policy's options): the ratio of the scales is folded into ``W`` and ``b``."""
        weight, bias = self.weight_and_bias(dtype)
        if logit_options["softcap"] != self.logit_map.softcap:
            raise UnsupportedModelError(
                f"{self.name}: its logit soft cap ({self.logit_map.softcap}) differs from the other model's "
                f"({logit_options['softcap']}), so one fused pass cannot score both; precompute the "
                "reference log-probs instead")
        ratio = self.logit_map.logit_scale / logit_options["logit_scale"]
        if ratio != 1.0:
            weight, bias = weight * ratio, None if bias is None else bias * ratio
        return weight, bias


class _Cached:
    """Holds a model's description; copies and pickles of the model start without one."""

    __slots__ = ("value",)

    def __init__(self, value=None):
        self.value = value

    def __deepcopy__(self, memo):
        return _Cached()

    def __reduce__(self):
        return (_Cached, ())


def _head_key(head: nn.Module | None) -> tuple:
    return (id(head), type(head), adapter_key(head) if head is not None else ())


def describe_lm_head(model: nn.Module) -> LMHead:
    """The cached :class:`LMHead` of ``model`` (a transformers causal LM, or a PEFT model around one).

    Raises :class:`UnsupportedModelError` naming the model type when the fused path cannot reproduce it.
    """
    base = unwrap(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    cached = base.__dict__.get(_CACHE)
    if cached is not None and cached.value is not None and cached.value.key == _head_key(head):
        return cached.value
    description = _describe(base, head)
    base.__dict__[_CACHE] = _Cached(description)
    return description


def head_weights(head: nn.Module | None, name: str) -> HeadWeights:
    """How to read ``head``'s weight and bias each step: through PEFT's wrapper (``peft.py``, which reads the
    module it wraps with this function) or as the module it is (``weights.py``)."""
    if head is not None and type(head).__module__.split(".")[0] == "peft":
        return peft_head_weights(head, name, head_weights)
    return unwrapped_head_weights(head, name)


def _describe(base: nn.Module, head: nn.Module | None) -> LMHead:
    name = model_name(base)
    weights = head_weights(head, name)
    was_training = base.training
    base.eval()  # no dropout in the probe
    try:
        with torch.no_grad():
            weight, _ = weights.read()
        logit_map = probe_logit_map(base, head, weight.shape[0], weight.device, name)
    finally:
        base.train(was_training)
    vocab = logit_map.vocab or int(weight.shape[0])
    return LMHead(name, head, weights, logit_map, int(weight.shape[1]), vocab, _head_key(head))
