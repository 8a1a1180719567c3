"""What a model does to its logits after the LM head, found by feeding it known values.

The head's ``forward`` is stubbed to return known numbers ``t`` (one per vocabulary entry) and the
model's output is read back. Fitted forms (``c``: a constant, irrelevant to log-softmax):

* ``y = s * t + c``                    -> ``logit_scale = s`` (Granite's ``/ logits_scaling``,
  Cohere's ``* logit_scale``, Falcon-H1's ``* lm_head_multiplier``, HyperCLOVA X, ...)
* ``y = C * tanh(s * t / C) + c``      -> ``logit_scale = s``, ``softcap = C`` (Gemma 2/3/4, xLSTM,
  RecurrentGemma, ...: whatever the attribute is called and wherever the config keeps it)
* an output narrower than the head     -> only its first ``vocab`` entries are logits (Inkling)

This needs no table of config attributes, whose names do not tell the operation (``logits_scaling``
divides Granite's logits, multiplies HyperCLOVA X's and divides MiniCPM3's hidden states) and which
some models declare without applying (MPT's ``logit_scale``). Anything else is refused.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from upo.heads.capture import call_causal_lm, output_logits, recorded_head
from upo.heads.errors import UnsupportedModelError

TINY = 1e-2  # the probe values next to 0, for the slope at 0
SPAN = 100.0  # the largest probe value: beyond any logit a softcap leaves unbent


@dataclass(frozen=True)
class LogitMap:
    logit_scale: float = 1.0
    softcap: float | None = None
    vocab: int | None = None  # logits are the first ``vocab`` outputs of the head (None: all)


def probe_values(vocab: int) -> torch.Tensor:
    """0, +TINY, -TINY, then -SPAN .. SPAN: the small values first (a narrower output keeps a prefix)."""
    rest = torch.linspace(-SPAN, SPAN, max(vocab - 3, 2))[: vocab - 3]
    return torch.cat([torch.tensor([0.0, TINY, -TINY]), rest])[:vocab]


def probe_logit_map(model: nn.Module, head: nn.Module, vocab: int, device: torch.device, name: str) -> LogitMap:
    """Run ``model`` twice on two tokens with ``head`` returning zeros, then ``probe_values``; fit."""
    if vocab < 8:
        raise UnsupportedModelError(f"{name}: a vocabulary of {vocab} entries is too small to probe")
    input_ids = torch.full((1, 2), min(5, vocab - 1), dtype=torch.long, device=device)

    def run(values: torch.Tensor) -> torch.Tensor:
        values = values.to(device)
        with torch.no_grad(), recorded_head(head, lambda x: values.expand(*x.shape[:-1], vocab)) as seen:
            out = output_logits(call_causal_lm(model, input_ids))
        if len(seen) != 1:
            raise UnsupportedModelError(f"{name}: its forward calls the LM head {len(seen)} times; upo needs "
                                        "one vocabulary projection of one hidden state per token")
        rows = out.detach().double().reshape(-1, out.shape[-1])
        if not bool(torch.isfinite(rows).all()):
            raise UnsupportedModelError(f"{name}: its logits are not finite for finite head outputs")
        if not torch.allclose(rows, rows[:1].expand_as(rows), rtol=1e-5, atol=1e-5):
            raise UnsupportedModelError(f"{name}: what it does to the LM head's output depends on the position")
        return rows[0]

    offset = run(torch.zeros(vocab))
    kept = offset.shape[-1]
    if kept > vocab or kept < 4:
        raise UnsupportedModelError(f"{name}: it returns {kept} logits per token from a head of {vocab} outputs")
    t = probe_values(vocab)[:kept].double()
    y = run(probe_values(vocab)) - offset
    if not torch.allclose(offset, offset[:1].expand_as(offset), rtol=1e-5, atol=1e-5):
        raise UnsupportedModelError(f"{name}: it adds a per-vocabulary offset to the LM head's output")
    scale, softcap = _fit(t, y, name)
    return LogitMap(scale, softcap, kept if kept < vocab else None)


def _fit(t: torch.Tensor, y: torch.Tensor, name: str) -> tuple[float, float | None]:
    """``y = s t`` or ``y = C tanh(s t / C)``, to a relative 1e-4 of the largest output."""
    tolerance = 1e-4 * max(1.0, float(y.abs().max()))
    slope = float((y[1] - y[2]) / (2 * TINY))
    if not (math.isfinite(slope) and slope > 0):
        raise UnsupportedModelError(f"{name}: its logits do not increase with the LM head's output "
                                    f"(slope {slope:.3g} at 0)")
    linear = float((t * y).sum() / (t * t).sum())  # least squares over every probe value
    if float((y - linear * t).abs().max()) <= tolerance:
        return _snapped(linear), None
    top = int(t.argmax())
    cap = None
    for _ in range(20):  # alternate: the cap from the top value given the slope, the slope from TINY given the cap
        cap = _cap_through(float(t[top]) * slope, float(y[top]))
        if cap is None:
            break
        ratio = float(y[1]) / cap
        if abs(ratio) >= 1:
            cap = None
            break
        slope = cap * math.atanh(ratio) / TINY
    if cap is None or float((y - cap * torch.tanh(slope * t / cap)).abs().max()) > tolerance:
        raise UnsupportedModelError(f"{name}: the logits are a function of the LM head's output that is neither "
                                    "a scaling nor a tanh soft cap; upo's kernels cannot reproduce it")
    return _snapped(slope), cap


def _snapped(scale: float) -> float:
    """1.0 when within fitting noise of it (the kernels then skip the scaling)."""
    return 1.0 if abs(scale - 1.0) < 1e-6 else scale


def _cap_through(linear: float, capped: float) -> float | None:
    """``C`` with ``C tanh(linear / C) = capped`` (``0 < capped < linear``), by bisection in log space."""
    if not 0 < capped < linear:
        return None
    low, high = capped, 1e9
    for _ in range(200):
        middle = math.sqrt(low * high)
        if middle * math.tanh(linear / middle) < capped:
            low = middle
        else:
            high = middle
    return math.sqrt(low * high)
