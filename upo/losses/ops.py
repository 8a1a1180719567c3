"""Numerically careful scalar functions shared by the loss families."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def log_sigmoid(x: Tensor) -> Tensor:
    """log sigma(x) as -softplus(-x).

    Same values and gradients as ``F.logsigmoid``, whose CPU kernel enters a parallel
    region even for a handful of elements and then costs milliseconds per call on a busy
    host. Above the threshold softplus is the identity, and the neglected ``exp(-50)`` is
    below float64 resolution.
    """
    return -F.softplus(-x, threshold=50.0)


def smoothed_logistic(logits: Tensor, eps: float) -> Tensor:
    """Conservative logistic loss: label eps flipped (cDPO)."""
    return -(1 - eps) * log_sigmoid(logits) - eps * log_sigmoid(-logits)


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, branching at -ln 2 to avoid cancellation (Maechler 2012)."""
    return torch.where(x < -math.log(2.0), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))
