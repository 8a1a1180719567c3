"""What each rank of a vocabulary-parallel test runs (``test_vocab_parallel.py`` spawns them).

Every rank builds the same full inputs from the seed, keeps its rows of the LM head, and
compares the sharded result with the single-process one it computes itself: the float64
oracle (``upo_kernels.reference``) for the kernels, the unsharded ``upo.fused_loss`` for the
losses. A check raises AssertionError on its rank; ``torch.multiprocessing.spawn`` reports it.
"""
from __future__ import annotations

import faulthandler
import os
import weakref

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

import upo
from upo_kernels import TOKEN_STATS, linear_logprobs, reference


def init(rank, world, init_file):
    faulthandler.enable()  # a rank that dies by a signal (SIGABRT in C++) prints where its threads were
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)


def finish():
    """Every rank at the barrier before any tears gloo down: a rank that destroyed its group while a peer
    still talked to it died in C++ ("terminate called without an active exception", SIGABRT) under load."""
    dist.barrier()
    dist.destroy_process_group()


def uneven_sizes(vocab, world):
    """Shard sizes that differ across ranks (e.g. 37 over 3 ranks -> 17, 12, 8)."""
    weights = [world + 2 - r for r in range(world)]
    sizes = [vocab * w // sum(weights) for w in weights]
    sizes[0] += vocab - sum(sizes)
    return sizes


def hand_shards(vocab, world):
    """(offset, size) per rank, with the shards laid out in reverse rank order (offsets need not
    follow the ranks)."""
    sizes = uneven_sizes(vocab, world)
    offsets, start = [0] * world, 0
    for r in reversed(range(world)):
        offsets[r], start = start, start + sizes[r]
    return offsets, sizes


def head_inputs(seed, n, d, v, dtype, ties=True):
    """hidden [n, d], weight [v, d], bias [v], labels [n] (every 4th ignored). With ``ties``, the
    label of token 1 has the max logit, tied with a column in a shard left of it; that of token 2
    ties with a column right of it (TRL's rule: ties go to the first id)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, dtype=torch.float64)
    weight = torch.randn(v, d, generator=g, dtype=torch.float64) / d**0.5
    bias = torch.randn(v, generator=g, dtype=torch.float64)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::4] = -100
    if ties:
        # the two tied columns are labels of the planted tokens only: another token labelled with one of them
        # would meet an accidental tie of its random logits, decided by each shard's last bit
        labels[(labels == 1) | (labels == v - 2)] = 0
        for token, (label, twin) in ((1, (v - 2, 1)), (2, (1, v - 2))):
            # small integers and quarters: every partial sum of h . w is exact in fp32 and fp64, so the two
            # logits tie bit for bit whatever order a shard's matmul adds them in (with h / |h| they could
            # differ in the last bit, and the tie went to either column: a seed-dependent failure)
            signs = torch.randint(0, 2, (d,), generator=g, dtype=torch.float64) * 2 - 1
            hidden[token] = signs * torch.randint(2, 4, (d,), generator=g, dtype=torch.float64)
            weight[label] = weight[twin] = hidden[token] / 4
            bias[label] = bias[twin] = 0.0
            labels[token] = label
    cast = [t.to(dtype) for t in (hidden, weight, bias)]
    return (*cast, labels)


def _max_err(a, b):
    return float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0


KERNEL_VARIANTS = (("torch", "dtensor"), ("torch", "hand"), ("triton", "hand"))


def check_kernels(rank, world, init_file, seed):
    """Per-token log-probs, every statistic and the gradients (hidden, weight shard, bias shard)
    against the float64 oracle, with bias, logit scale and soft cap: each backend, DTensor and
    hand-sharded heads (one set of processes for all: each costs seconds to start)."""
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: the Triton backend on CPU
    init(rank, world, init_file)
    for k, (backend, sharding) in enumerate(KERNEL_VARIANTS):
        _check_kernel_variant(rank, world, seed + k, backend, sharding)
    finish()


def _check_kernel_variant(rank, world, seed, backend, sharding):
    dtype, tol = (torch.float64, 1e-12) if backend == "torch" else (torch.float32, 1e-5)
    n, d, v = 29, 12, 37
    hidden, weight, bias, labels = head_inputs(seed, n, d, v, dtype)
    coef = torch.randn(n, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    options = dict(logit_scale=0.8, softcap=6.0)
    h_ref, w_ref, b_ref = (t.detach().double().clone().requires_grad_() for t in (hidden, weight, bias))
    ref = reference.reference_token_logprobs(h_ref, w_ref, labels, b_ref, **options)
    (ref * coef).sum().backward()
    ref_stats = reference.reference_token_stats(hidden.double(), weight.double(), labels, bias.double(), **options)
    assert ref_stats["is_top1"][1] == 0 and ref_stats["is_top1"][2] == 1, "the tie cases are not ties at the max"
    if sharding == "dtensor":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (world,))
        w = distribute_tensor(weight, mesh, [Shard(0)]).requires_grad_()
        b = distribute_tensor(bias, mesh, [Shard(0)]).requires_grad_()
        start = sum(w_.shape[0] for w_ in torch.chunk(weight, world)[:rank])
        rows = slice(start, start + w.to_local().shape[0])
        kwargs = {}
    else:
        offsets, sizes = hand_shards(v, world)
        rows = slice(offsets[rank], offsets[rank] + sizes[rank])
        w, b = weight[rows].clone().requires_grad_(), bias[rows].clone().requires_grad_()
        kwargs = dict(process_group=dist.group.WORLD, vocab_offset=offsets[rank])
    h = hidden.clone().requires_grad_()
    out = linear_logprobs(h, w, labels, bias=b, backend=backend, stats=TOKEN_STATS, **options, **kwargs)
    (out.logp.double() * coef).sum().backward()
    local = (lambda t: t.to_local()) if sharding == "dtensor" else (lambda t: t)
    errors = {"logp": _max_err(out.logp, ref), "grad_hidden": _max_err(h.grad, h_ref.grad),
              "grad_weight": _max_err(local(w.grad), w_ref.grad[rows]),
              "grad_bias": _max_err(local(b.grad), b_ref.grad[rows])}
    errors.update({name: _max_err(out.stats[name], ref_stats[name]) for name in TOKEN_STATS})
    bad = {k: e for k, e in errors.items() if not e <= (0 if k == "is_top1" else tol)}
    assert not bad, f"rank {rank} of {world}, {backend}, {sharding}, seed {seed}: errors {bad}"


def _loss_kwargs(loss_type, pairs, seed):
    import test_fused_loss  # the per-loss arguments the single-process tests use

    return test_fused_loss.loss_kwargs_for(loss_type, pairs, seed)


def check_every_loss(rank, world, init_file, seed):
    """``upo.fused_loss`` of every loss type (UPO included), with the reference pass from reference
    hidden states and the token statistics, on a ``Shard(0)`` DTensor head: loss, metrics and
    gradients equal the unsharded call's (float64, chunked backend)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    init(rank, world, init_file)
    mesh = init_device_mesh("cpu", (world,))
    pairs, t, d, v = 3, 7, 8, 41
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * pairs, t, d, generator=g, dtype=torch.float64)
    ref_hidden = hidden + 0.3 * torch.randn(hidden.shape, generator=g, dtype=torch.float64)
    weight = torch.randn(v, d, generator=g, dtype=torch.float64)
    labels = torch.randint(0, v, (2 * pairs, t), generator=g)
    labels[:, :2] = -100
    labels[0, -2:] = -100
    chunks = torch.chunk(weight, world)  # DTensor's Shard(0) layout
    start = sum(c.shape[0] for c in chunks[:rank])
    rows = slice(start, start + chunks[rank].shape[0])
    failures = []
    for loss_type in upo.available_losses():
        kwargs = _loss_kwargs(loss_type, pairs, seed)
        kwargs = {k: (x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x)
                  for k, x in kwargs.items()}
        results = []
        for sharded in (False, True):
            h = hidden.clone().requires_grad_()
            w = (distribute_tensor(weight, mesh, [Shard(0)]) if sharded else weight.clone()).requires_grad_()
            out = upo.fused_loss(h, w, labels, ref_hidden=ref_hidden, backend="torch", token_stats=True, **kwargs)
            out.loss.backward()
            grad_w = w.grad.to_local() if sharded else w.grad[rows]
            results.append((out.loss, out.metrics, h.grad, grad_w))
        (loss, metrics, gh, gw), (loss_s, metrics_s, gh_s, gw_s) = results
        errors = {"loss": _max_err(loss_s, loss), "grad_hidden": _max_err(gh_s, gh), "grad_weight": _max_err(gw_s, gw)}
        errors.update({f"metrics/{k}": _max_err(torch.as_tensor(metrics_s[k]), torch.as_tensor(m))
                       for k, m in metrics.items()})
        bad = {k: e for k, e in errors.items() if not e <= 1e-10}
        if bad or metrics.keys() != metrics_s.keys():
            failures.append(f"{loss_type}: {bad or 'metric names differ'}")
    assert not failures, f"rank {rank} of {world}, seed {seed}: " + "; ".join(failures)
    finish()


class PeakLiveBytes(TorchDispatchMode):
    """The most bytes of tensors created inside the mode that were alive at once (CPU tensors have
    no allocator statistics; each new storage counts until it is freed)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen = set()

    def _freed(self, key, size):
        self._seen.discard(key)
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self._seen:
                    self._seen.add(key)
                    self.live += storage.nbytes()
                    weakref.finalize(storage, self._freed, key, storage.nbytes())
        self.peak = max(self.peak, self.live)
        return out


MEMORY_CASE = dict(n=48, d=16, v=6000)


def head_pass_peak(weight_rows, hidden, labels, **shard):
    """Peak bytes alive during one forward + backward of ``linear_logprobs`` on these weight rows
    (this rank's shard, which counts: it is per-rank memory too)."""
    h, w = hidden.clone().requires_grad_(), weight_rows.clone().requires_grad_()
    with PeakLiveBytes() as meter:
        linear_logprobs(h, w, labels, backend="torch", chunk_vocab=256, **shard).sum().backward()
    return meter.peak


def check_memory(rank, world, init_file, seed, result_file):
    """Rank 0 (the largest shard) writes its peak bytes and shard rows to ``result_file``."""
    init(rank, world, init_file)
    hidden, weight, _, labels = head_inputs(seed, *MEMORY_CASE.values(), torch.float32, ties=False)
    offsets, sizes = hand_shards(MEMORY_CASE["v"], world)
    rows = slice(offsets[rank], offsets[rank] + sizes[rank])
    peak = head_pass_peak(weight[rows], hidden, labels, process_group=dist.group.WORLD, vocab_offset=offsets[rank])
    if rank == 0:
        with open(result_file, "w") as f:
            f.write(f"{peak} {sizes[0]}")
    finish()


def check_bad_input(rank, world, init_file):
    """Each mistake gives the same clear ValueError on every rank (none is left in a collective)."""
    init(rank, world, init_file)
    hidden, weight, bias, labels = head_inputs(0, 10, 6, 19, torch.float64, ties=False)
    group = dist.group.WORLD
    offsets, sizes = hand_shards(19, world)
    mine = slice(offsets[rank], offsets[rank] + sizes[rank])
    cases = {
        "do not tile": dict(weight=weight[mine], vocab_offset=offsets[rank] + (1 if rank == 0 else 0)),
        "different labels": dict(weight=weight[mine], vocab_offset=offsets[rank],
                                 labels=labels + (rank if rank else 0) * (labels >= 0)),
        "different tokens": dict(weight=weight[mine], vocab_offset=offsets[rank], hidden=hidden[: 10 - rank],
                                 labels=labels[: 10 - rank]),
        "labels must be in [0, 19)": dict(weight=weight[mine], vocab_offset=offsets[rank],
                                          labels=torch.cat([labels[:-1], torch.tensor([19])])),
        "vocab_offset is missing": dict(weight=weight[mine], vocab_offset=None),
        "vocab_offset must be a non-negative int": dict(weight=weight[mine], vocab_offset=-3),
        # a NaN in rank 1's shard reaches every rank's log-probs: all raise (rank 1 names its weight)
        "non-finite log-probs": dict(weight=weight[mine].clone().fill_(float("nan")) if rank == 1 else weight[mine],
                                     vocab_offset=offsets[rank]),
    }
    for expected, case in cases.items():
        args = {"hidden": hidden, "labels": labels, **case}
        try:
            linear_logprobs(args["hidden"], args["weight"], args["labels"], backend="torch", process_group=group,
                            vocab_offset=args["vocab_offset"])
        except ValueError as err:
            assert expected in str(err), f"rank {rank}: {expected!r} not in {err}"
            assert "\n" not in str(err), str(err)
        else:
            raise AssertionError(f"rank {rank}: no error for {expected!r}")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    only_rank_0 = dist.new_group([0])
    dtensor_cases = {
        "must be Shard(0)": dict(weight=distribute_tensor(weight, mesh, [Replicate()])),
        "mismatched groups": dict(weight=distribute_tensor(weight, mesh, [Shard(0)]), process_group=only_rank_0),
        "vocab_offset is given by weight's DTensor layout": dict(weight=distribute_tensor(weight, mesh, [Shard(0)]),
                                                                 vocab_offset=0),
    }
    for expected, case in dtensor_cases.items():
        try:
            linear_logprobs(hidden, case["weight"], labels, backend="torch", process_group=case.get("process_group"),
                            vocab_offset=case.get("vocab_offset"))
        except ValueError as err:
            assert expected in str(err) and "\n" not in str(err), f"rank {rank}: {expected!r} not in {err}"
        else:
            raise AssertionError(f"rank {rank}: no error for {expected!r}")
    finish()
