"""Live tensors on CPU, whatever the allocator holds: the bytes alive at a moment, and the peak over a block.

The resident set counts what the allocator keeps (glibc's malloc keeps freed heap; tcmalloc and jemalloc keep
caches), so it is the process's memory as ``top`` and the out-of-memory killer see it, not the tensors'. The
tensors' own bytes come from PyTorch:

- :func:`tensor_bytes_alive`: every CPU storage a Python tensor object holds now (the model, a reference,
  the optimiser's state, a cache), each storage once;
- :class:`LiveTensorPeak`: the most bytes that PyTorch's CPU allocations made in a block hold at one moment,
  from the profiler's allocation events (``total_allocated`` counts from the block's start). A tensor older
  than the block is not seen freed (the profiler never learnt its size). Slow (the profiler records every
  op), so run it on a step apart from a timed one.

Their sum is a step's live-tensor peak, exact when the step frees nothing that was alive at its start but
tensors it made (a training step whose start holds only the model, reference and optimiser state: its state
is never freed), else an upper bound. Allocations outside PyTorch (oneDNN's scratch, Python objects) are not
tensors and are left to the resident set.
"""
from __future__ import annotations

import gc

import torch


def tensor_bytes_alive(device: str = "cpu") -> int:
    """Bytes of the distinct storages of the tensors alive on ``device`` (those a Python object refers to)."""
    storages = {}
    for obj in gc.get_objects():
        try:
            if not issubclass(type(obj), torch.Tensor) or obj.device.type != device:  # type(): no proxy's __class__
                continue
            storage = obj.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensors without a storage (sparse, meta, wrappers)
            continue
        if storage.data_ptr():
            storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
    return sum(storages.values())


def _allocations(nodes, device: str):
    from torch._C._profiler import _EventType

    stack = list(nodes)
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and str(node.extra_fields.device).startswith(device):
            yield node.start_time_ns, node.extra_fields.total_allocated
        stack.extend(node.children)


class LiveTensorPeak:
    """``with LiveTensorPeak() as live: step()`` -> ``live.extra``: the most bytes of CPU tensors made in the block
    and alive at one moment (0 if it made none)."""

    def __init__(self, device: str = "cpu"):
        self.device = device
        self.extra = None
        self._profile = None

    def __enter__(self) -> "LiveTensorPeak":
        from torch.profiler import ProfilerActivity, profile

        gc.collect()
        self._profile = profile(activities=[ProfilerActivity.CPU], profile_memory=True).__enter__()
        return self

    def __exit__(self, *exc) -> bool:
        self._profile.__exit__(*exc)
        tree = self._profile.profiler.kineto_results.experimental_event_tree()
        self.extra = max([0, *(total for _, total in _allocations(tree, self.device))])
        self._profile = None
        return False
