"""Test set-up: Triton kernels run under the interpreter unless a CUDA device is present.

TRITON_INTERPRET must be decided before any module decorated with ``triton.jit`` is
imported, so this file sets it first. ``UPO_TEST_GPU=1`` forces the compiled path.
"""
import os

if "TRITON_INTERPRET" not in os.environ and os.environ.get("UPO_TEST_GPU") != "1":
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
