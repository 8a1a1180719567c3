"""Output-buffer allocation shared by all kernels.

Every kernel output is allocated here. Under ``poison_outputs()`` (tests) the buffers are
filled with NaN (floats) or a sentinel (ints) instead of left uninitialised, so a test can
prove that a kernel wrote every element it returns.
"""
from __future__ import annotations

import contextlib
import os

import torch

_poison = os.environ.get("UPO_POISON_OUTPUTS") == "1"
INT_SENTINEL = -(2**31) + 7


def empty(shape, dtype, device) -> torch.Tensor:
    """``torch.empty`` that is NaN/sentinel-filled while poisoning is on."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if _poison:
        out.fill_(float("nan") if out.is_floating_point() else INT_SENTINEL)
    return out


@contextlib.contextmanager
def poison_outputs(enabled: bool = True):
    """Fill every kernel output buffer with NaN before the kernel runs (tests only)."""
    global _poison
    previous, _poison = _poison, enabled
    try:
        yield
    finally:
        _poison = previous
