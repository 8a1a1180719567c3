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


def _share_the_cores_between_workers() -> None:
    """Under ``pytest -n W`` each worker takes cores // W intra-op threads (and so do the processes it starts):
    torch's default, every core per worker, put 4 busy-waiting OpenMP threads on CI's 2 cores, where two 2-thread
    torch processes slow each other down up to 9x."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        torch.set_num_threads(threads)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))


_share_the_cores_between_workers()

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def pytest_terminal_summary(terminalreporter):
    """The all-architectures test's counts (``test_model_heads.py``), summed over its chunks and workers."""
    totals: dict[str, int] = {}
    for report in terminalreporter.stats.get("passed", []) + terminalreporter.stats.get("failed", []):
        for name, counts in getattr(report, "user_properties", []):
            if name == "model_heads_counts" and report.when == "call":
                for kind, n in counts.items():
                    totals[kind] = totals.get(kind, 0) + n
    if totals:
        terminalreporter.write_line("model heads (transformers causal LMs): " + " / ".join(
            f"{totals.get(kind, 0)} {kind}" for kind in ("agree", "refused", "not buildable")))
