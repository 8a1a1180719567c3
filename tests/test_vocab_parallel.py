"""A vocabulary-sharded LM head (tensor parallelism): 2 and 3 processes on the gloo backend,
uneven shards, against the single-process result (checks in ``vocab_parallel_checks.py``)."""
from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

import vocab_parallel_checks as checks
from helpers import new_seed


def spawn(world, check, tmp_path, *args):
    mp.spawn(check, args=(world, str(tmp_path / "init"), *args), nprocs=world, join=True)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("backend,sharding", [("torch", "dtensor"), ("torch", "hand"), ("triton", "hand")])
def test_logprobs_statistics_and_gradients_equal_the_single_process_oracle(world, backend, sharding, tmp_path):
    spawn(world, checks.check_kernels, tmp_path, new_seed(), backend, sharding)


@pytest.mark.parametrize("world", [2, 3])
def test_every_loss_on_a_dtensor_head_equals_the_unsharded_loss(world, tmp_path):
    spawn(world, checks.check_every_loss, tmp_path, new_seed())


def test_peak_memory_per_rank_falls_with_the_number_of_shards(tmp_path):
    hidden, weight, _, labels = checks.head_inputs(0, *checks.MEMORY_CASE.values(), torch.float32, ties=False)
    vocab = checks.MEMORY_CASE["v"]
    peaks = {1: (checks.head_pass_peak(weight, hidden, labels), vocab)}  # unsharded, in this process
    for world in (2, 3):
        (tmp_path / str(world)).mkdir()
        spawn(world, checks.check_memory, tmp_path / str(world), 0, str(tmp_path / str(world) / "peak"))
        peaks[world] = tuple(map(int, (tmp_path / str(world) / "peak").read_text().split()))
    # the working set is the shard's: weight and weight-gradient rows, logit tiles of its vocabulary
    assert peaks[1][0] > peaks[2][0] > peaks[3][0], peaks
    for world in (2, 3):
        peak, rows = peaks[world]
        assert peak / peaks[1][0] < 1.5 * rows / vocab, peaks


def test_bad_shards_and_mismatched_ranks_are_clear_errors_on_every_rank(tmp_path):
    spawn(2, checks.check_bad_input, tmp_path)


@pytest.mark.parametrize("backend,impl", [("torch", None), ("triton", "fused"), ("triton", "cublas")])
def test_backends_treat_another_shards_label_as_no_target(monkeypatch, backend, impl):
    """The contract the sharded merge builds on, per backend: a kept label outside ``[0, V)``
    counts in the normaliser and the statistics, has target logit 0 (logp = -lse) and no one-hot
    part in the backward; the max logit comes with the statistics (for is_top1)."""
    from upo_kernels import reference
    from upo_kernels.backends import ops
    from upo_kernels.token_stats import MAX_LOGIT

    monkeypatch.delenv("UPO_FWD_IMPL", raising=False)
    if impl:
        monkeypatch.setenv("UPO_FWD_IMPL", impl)
    seed = new_seed()
    hidden, weight, bias, labels = checks.head_inputs(seed, 23, 10, 45, torch.float32, ties=False)
    labels = labels.clamp(min=0)
    foreign = torch.arange(23) % 3 == 0
    labels = torch.where(foreign, 45 + torch.arange(23) % 2, labels)  # V and V + 1: ids of the next shard
    options = dict(logit_scale=0.9, softcap=5.0)
    kernel = ops(backend)
    logp, lse, values = kernel.forward(hidden, weight, labels, bias, 0.9, 5.0, -1, chunk_tokens=8, chunk_vocab=16,
                                       stats=("entropy", "log_sum_sq_probs", "mean_logits", MAX_LOGIT))
    z = reference.reference_logits(hidden, weight, bias, **options)
    ref_lse = torch.logsumexp(z, dim=1)
    safe = torch.where(foreign, 0, labels)
    ref_logp = torch.where(foreign, -ref_lse, z.gather(1, safe[:, None]).squeeze(1) - ref_lse)
    ref = reference.reference_token_stats(hidden, weight, safe, bias, **options)
    errors = {"logp": (logp - ref_logp).abs().max(), "lse": (lse - ref_lse).abs().max(),
              "max_logit": (values[MAX_LOGIT] - z.max(dim=1).values).abs().max()}
    errors.update({k: (values[k] - ref[k]).abs().max() for k in ("entropy", "log_sum_sq_probs", "mean_logits")})
    assert all(float(e) < 2e-5 for e in errors.values()), (seed, errors)
    g = torch.randn(23, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    grad_h, grad_w, grad_b = kernel.backward(g, hidden, weight, labels, lse, bias, 0.9, 5.0, -1, chunk_tokens=8,
                                             chunk_vocab=16)
    h, w, b = (t.double().requires_grad_() for t in (hidden, weight, bias))
    zz = reference.reference_logits(h, w, b, **options)
    onehot = torch.zeros_like(zz).scatter_(1, safe[:, None], 1.0) * (~foreign)[:, None]
    ((zz * onehot).sum(1) - torch.logsumexp(zz, 1)).mul(g.double()).sum().backward()
    for name, got, want in (("grad_hidden", grad_h, h.grad), ("grad_weight", grad_w, w.grad), ("grad_bias", grad_b, b.grad)):
        assert float((got.double() - want).abs().max()) < 2e-5, (seed, name)
