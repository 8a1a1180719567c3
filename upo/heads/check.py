"""The check that does not depend on knowing the architecture: fused path vs the model's own logits.

On a small slice (a couple of short sequences) the model's own ``log_softmax(model(ids).logits)`` is
compared with the fused kernels on the described head, at the next tokens and at random tokens. The
slice is small, so this costs two forwards of it and one ``[tokens, vocab]`` product (well under a
second on CPU for small models). A disagreement raises :class:`LogitCheckError`.

Tolerance: 1e-3, plus the rounding of the model's own logits in its dtype, or autocast's when the check runs
under autocast (``2 * eps * max |logit|``:
0 in effect for fp32, about 0.3 for bf16 logits of 20), so a wrong scale or a missed soft cap (errors
of several nats) is caught in any dtype and fp32 models are checked tightly.
"""
from __future__ import annotations

import torch
from torch import nn

from upo.heads.capture import call_causal_lm, output_logits
from upo.heads.describe import describe_lm_head
from upo.heads.errors import LogitCheckError, UnsupportedModelError, unwrap
from upo_kernels import linear_logprobs

ROWS, TOKENS = 2, 16


def check_lm_head(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                  rows: int = ROWS, tokens: int = TOKENS, backend: str = "auto",
                  tolerance: float | None = None) -> float:
    """``max |log p_fused - log p_model|`` on ``input_ids[:rows, :tokens]``; raises :class:`LogitCheckError`
    above the tolerance. Marks the model's description as checked. Runs in eval mode, without grad."""
    description = describe_lm_head(model)
    base = unwrap(model)
    ids = input_ids[:rows, :tokens]
    mask = None if attention_mask is None else attention_mask[:rows, :tokens]
    if ids.dim() != 2 or ids.shape[1] < 2:
        raise ValueError(f"the logit check needs input_ids [rows, >= 2 tokens], got shape {tuple(input_ids.shape)}")
    was_training = base.training
    base.eval()
    try:
        with torch.no_grad():
            own = output_logits(call_causal_lm(base, ids, mask))
            hidden = description.hidden_states(base, ids, mask)
            error, tol = _compare(description, own, hidden, ids, mask, backend, tolerance)
    finally:
        base.train(was_training)
    if not error <= tol:  # also NaN
        raise LogitCheckError(description.name, error, tol)
    description.checked = True
    return error


def _compare(description, own, hidden, ids, mask, backend, tolerance) -> tuple[float, float]:
    """(max |d log p| at the next and at random tokens, the tolerance)."""
    weight, bias = description.weight_and_bias(hidden.dtype)
    if own.shape[:2] != ids.shape or own.shape[-1] != weight.shape[0]:
        raise UnsupportedModelError(f"{description.name} returns logits of shape {tuple(own.shape)} for input_ids "
                                    f"{tuple(ids.shape)} and a head of {weight.shape[0]} outputs")
    reference = own.float().log_softmax(-1)
    generator = torch.Generator(device="cpu").manual_seed(0)
    random = torch.randint(0, weight.shape[0], ids.shape, generator=generator).to(ids.device)
    nxt = torch.full_like(ids, -100)
    nxt[:, :-1] = ids[:, 1:]
    keep = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    errors = [0.0]
    for labels in (nxt, random):
        labels = torch.where(keep & (labels >= 0), labels, torch.full_like(labels, -100))
        fused = linear_logprobs(hidden, weight, labels, bias=bias, backend=backend, **description.logit_options)
        used = labels != -100
        if bool(used.any()):
            theirs = reference.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            errors.append(float((fused.float() - theirs)[used].abs().max()))
    error = float(torch.tensor(errors).max())  # NaN stays NaN
    if tolerance is None:
        # under autocast (a caller's, or one wrapped around the model's forward, which then returns its
        # low-precision logits as fp32) the model's own logits carry autocast's rounding
        dtypes = [own.dtype, hidden.dtype]
        if torch.amp.is_autocast_available(ids.device.type) and torch.is_autocast_enabled(ids.device.type):
            dtypes.append(torch.get_autocast_dtype(ids.device.type))
        rounding = max(torch.finfo(dtype).eps for dtype in dtypes)
        rounding = 0.0 if rounding < 1e-6 else rounding  # fp32: already inside 1e-3
        tolerance = 1e-3 + 2 * rounding * float(own.float()[keep].abs().max())
    return error, tolerance
