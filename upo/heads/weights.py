"""The LM head as ``(W [V, D], b [V] | None)``: read each step, inside autograd.

A :class:`HeadWeights` is what ``describe_lm_head`` decided once about a head: its ``read()`` gives
this step's weight and bias (tensors that carry gradients to whatever parameters they come from).
This file holds that interface and the kinds of a head no PEFT wrapper holds (``unwrapped_head_weights``);
PEFT's wrappers (LoRA, ``modules_to_save``, trainable tokens) are read in ``peft.py``, and
``describe.py`` picks between the two. Kinds here:

* a module whose ``forward`` is ``nn.Linear.forward`` (plain, tied or not): its ``weight``/``bias``.
  ``isinstance(head, nn.Linear)`` is not the test: a subclass may change ``forward`` (Dory scales rows).
* any other module with a 2-D ``weight`` that behaves as ``F.linear(x, weight, bias)`` on random
  inputs: its ``weight``/``bias``; else, if it is affine in ``x``, the effective
  ``W = (head(I) - head(0))^T``, ``b = head(0)`` (one D-token pass through the head per step).
* anything else (no weight, a list of heads, a non-linear head): :class:`UnsupportedModelError`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from upo.heads.errors import UnsupportedModelError


class HeadWeights:
    """This step's ``(weight, bias)`` of a head; ``kind`` says how they are read (for messages)."""

    kind = "?"

    def read(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError


class LinearWeights(HeadWeights):
    def __init__(self, module: nn.Module, kind: str = "nn.Linear"):
        self.module, self.kind = module, kind

    def read(self):
        return self.module.weight, getattr(self.module, "bias", None)


class AffineWeights(HeadWeights):
    """A head that is affine in its input but not a plain ``F.linear``: its effective weight and bias."""

    def __init__(self, module: nn.Module, hidden_size: int, like: torch.Tensor):
        self.module, self.hidden_size = module, hidden_size
        self.dtype, self.device = like.dtype, like.device
        self.kind = f"{type(module).__name__}, affine: W = head(I) - head(0)"

    def read(self):
        eye = torch.eye(self.hidden_size, dtype=self.dtype, device=self.device)
        out = self.module(torch.cat([torch.zeros_like(eye[:1]), eye]))
        zero = out[0]
        return (out[1:] - zero).T, zero


def is_plain_linear(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward
            and isinstance(weight, torch.Tensor) and weight.dim() == 2)


def unwrapped_head_weights(head: nn.Module | None, name: str) -> HeadWeights:
    """How to read the weight and bias of ``head``, a module no PEFT wrapper holds, each step (``name``: the
    model, for messages)."""
    if head is None:
        raise UnsupportedModelError(f"{name} has no LM head (get_output_embeddings() is None)")
    if is_plain_linear(head):
        return LinearWeights(head)
    return _behaving_weights(head, name)


def _behaving_weights(head: nn.Module, name: str) -> HeadWeights:
    """A head that is not a plain ``nn.Linear``: accepted for what it computes, tested on random inputs."""
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise UnsupportedModelError(f"{name}: its LM head ({type(head).__name__}) has no [vocab, hidden] weight "
                                    "(e.g. one head per codebook); upo needs one vocabulary projection")
    hidden_size = weight.shape[1]
    generator = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(3, hidden_size, generator=generator).to(weight.device, weight.dtype)
    was_training = head.training
    head.eval()
    try:
        with torch.no_grad():
            y = head(x)
            if _close(y, F.linear(x, weight, getattr(head, "bias", None))):
                return LinearWeights(head, f"{type(head).__name__} (computes F.linear(x, weight, bias))")
            y0 = head(torch.zeros_like(x[:1]))
            affine = (_close(head(2 * x) - y0, 2 * (y - y0))
                      and _close(head(x[:1] + x[1:2]) - y0, (y[:1] - y0) + (y[1:2] - y0)))
    finally:
        head.train(was_training)
    if not affine:
        raise UnsupportedModelError(f"{name}: its LM head ({type(head).__name__}) is not linear in its input; "
                                    "upo's kernels compute softmax(h W^T + b) only")
    return AffineWeights(head, hidden_size, weight)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to rounding in their dtype (relative to the largest value)."""
    if a.shape != b.shape:
        return False
    eps = torch.finfo(a.dtype).eps
    a, b = a.double(), b.double()
    scale = float(b.abs().max()) if b.numel() else 0.0
    return bool(((a - b).abs() <= (1e-4 + 8 * eps) * scale + 1e-6).all())
