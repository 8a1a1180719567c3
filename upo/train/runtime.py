"""The process's device and, under ``torchrun``, its place in the process group and its wrapper.

Multi-process training goes through the standard engine only: ``torchrun`` sets
``WORLD_SIZE``, we call ``init_process_group`` and wrap the module with DDP or FSDP2;
the collectives here are the few the loop needs.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from upo.heads import decoder_layers
from upo.train.errors import UserError


@dataclass
class Runtime:
    """Device and process-group facts for this process."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    tp: int = 1  # --tp: processes per model copy (tensor_parallel.py)
    cp: int = 1  # --cp: processes per sequence (context_parallel.py)
    mesh: Any = None  # with tp > 1: the ("dp", "tp") DeviceMesh; with cp > 1: the ("dp", "cp") one

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def dp_rank(self) -> int:
        """This process's data-parallel coordinate: the ``tp`` ranks of one model copy, or the ``cp`` ranks that
        split one batch's sequences, share it (and its batch)."""
        return self.rank // self.batch_sharers

    @property
    def dp_size(self) -> int:
        return self.world_size // self.batch_sharers

    @property
    def batch_sharers(self) -> int:
        """How many processes run each batch (``--tp`` or ``--cp``; 1 under plain data parallelism)."""
        return self.tp * self.cp

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_runtime(device_choice: str) -> Runtime:
    """Pick the device and, under ``torchrun`` (WORLD_SIZE > 1), join the process group."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_choice == "auto":
        device_choice = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device_choice)
    except RuntimeError:
        raise UserError(f"--device: unknown device '{device_choice}' (use auto, cpu, cuda or cuda:N)") from None
    check_device_available(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank if world_size > 1 else torch.cuda.current_device())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return Runtime(device, dist.get_rank(), dist.get_world_size(), local_rank)
    return Runtime(device)


def check_processes_per_group(flag: str, size: int, what: str, world_size: int, is_main: bool = True) -> None:
    """``--tp``/``--cp`` ``size``: groups of ``size`` processes (``what`` each group does) need a process count it
    divides; one line, exit 2. Every rank raises it; rank 0 says it."""
    if size == 1:
        return
    if world_size == 1:
        raise UserError(f"{flag} {size} {what}: launch with torchrun --nproc-per-node {size} (or a multiple of "
                        f"{size}) -m upo.train {flag} {size} ...")
    if world_size % size:
        raise UserError(f"{flag} {size}: the {world_size} processes are not a multiple of {size}; use "
                        f"--nproc-per-node {size * max(1, world_size // size)} or a {flag} dividing {world_size}",
                        reported_by_main=not is_main)


def check_device_available(device: torch.device) -> None:
    """A device this machine has: ``--device mps`` without Metal, or ``cuda:3`` on a 2-GPU machine, is refused."""
    if device.type == "cpu":
        return
    backend = getattr(torch, device.type, None)  # torch.cuda, torch.mps, torch.xpu, ...
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        raise UserError(f"--device {device}: no {device.type} device on this machine (use auto or cpu)")
    count = getattr(backend, "device_count", None)
    if device.index is not None and count is not None and device.index >= count():
        raise UserError(f"--device {device}: this machine has {count()} {device.type} device(s)")


def check_backend(backend: str, device: torch.device) -> None:
    """The Triton kernels need CUDA tensors (or the Triton interpreter, which the CPU tests use)."""
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise UserError(f"--backend triton needs a CUDA device (this run is on {device}); use --backend torch "
                        "or auto")


def teardown_runtime(runtime: Runtime) -> None:
    """Leave the process groups and join gloo's threads while the interpreter is whole. ``destroy_process_group``
    leaves a group's worker threads running for as long as an object holds the group (the mesh, DDP's reducer);
    they then end during interpreter shutdown, where a worker that still drops a finished collective's tensors
    takes the GIL and is killed: "terminate called without an active exception", one rank's abort, seen under
    load. The caller drops its own holders (the trainer) first."""
    if runtime.distributed:
        import gc

        import torch.distributed as dist

        runtime.mesh = None
        if dist.is_initialized():
            dist.destroy_process_group()
        gc.collect()  # the groups' last holders sit in reference cycles (modules, hooks)


def barrier(runtime: Runtime) -> None:
    if runtime.distributed:
        torch.distributed.barrier()


def all_reduce_max(values: list[float], runtime: Runtime) -> list[float]:
    """Each value's maximum over the ranks: one tiny all-reduce, so that every rank decides alike."""
    if not runtime.distributed:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return tensor.tolist()


def broadcast_from_main(value, runtime: Runtime):
    """Rank 0's ``value`` (any picklable object) on every rank."""
    if not runtime.distributed:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(value: float, runtime: Runtime) -> float:
    if not runtime.distributed:
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    torch.distributed.all_reduce(tensor)
    return float(tensor)


def wrap_for_processes(module: nn.Module, runtime: Runtime, fsdp: bool, log) -> nn.Module:
    """DDP (or FSDP2's ``fully_shard`` per decoder layer with ``fsdp``) when distributed, else ``module``."""
    if fsdp and not runtime.distributed:
        log("note: --fsdp has no effect in a single process")
    if not runtime.distributed or runtime.tp > 1:  # --tp: already sharded; gradients averaged over dp by hand
        return module
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        if isinstance(module.reference, nn.Module):
            log("note: with --fsdp every process holds a full reference copy; --precompute-ref or --lora avoid it")
        for layer in decoder_layers(module.policy):
            fully_shard(layer)
        fully_shard(module)
        return module
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids, broadcast_buffers=False)


def gradient_sync(model: nn.Module, runtime: Runtime, last_micro_step: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
    if last_micro_step or not runtime.distributed:
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        return _fsdp_no_sync(model)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)
