"""Context parallelism (``--cp``): one pair's tokens split over processes.

Without processes: the balanced chunks, each rank's query segments against the dense mask of the unshared or shared
rows (float64, values and gradients), and the map of labelled tokens (every one on exactly one rank). With 2 and 3
gloo processes (``context_parallel_checks.py``): the module DDP wraps on split sequences against whole ones, loss,
metrics and every parameter's gradient summed over the ranks, in float64; and four planted faults, each of which
must fail that check.
"""
from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

import context_parallel_checks as checks
from helpers import new_seed
from upo.context_parallel import _plan_attention, causal_plan, shared_plan, split_rows
from upo.shared_prompt import SharedPromptRows
from upo_kernels.context_parallel import balanced_chunks, local_positions, padded_length


@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_balanced_chunks_cover_the_padded_sequence_once(size):
    for length in (1, 5, 2 * size, 37):
        padded = padded_length(length, size)
        assert padded % (2 * size) == 0 and length <= padded < length + 2 * size
        held = torch.cat([local_positions(padded, r, size) for r in range(size)])
        assert sorted(held.tolist()) == list(range(padded))
        for rank in range(size):  # chunk r and chunk 2N-1-r: as many early as late queries on every rank
            chunk, first, second = balanced_chunks(padded, rank, size)
            assert (first // chunk if chunk else rank, second // chunk if chunk else 2 * size - 1 - rank) == (
                rank, 2 * size - 1 - rank)


def _dense_allowed(length: int, span: tuple | None, width: int) -> torch.Tensor:
    """[length, length] True where query q may see key k: causal, or prompt sharing's row (from upo's own mask)."""
    if span is None:
        return torch.ones(length, length, dtype=torch.bool).tril()
    ids = torch.zeros(1, width, dtype=torch.long)
    allowed = torch.zeros(length, length, dtype=torch.bool)
    allowed[:width, :width] = SharedPromptRows(ids, ids, ids, spans=(span,)).allowed[0, 0]
    return allowed


@pytest.mark.parametrize("size", [2, 3])
@pytest.mark.parametrize("span", [None, (5, 3, 4), (2, 9, 1), (7, 1, 6)], ids=["causal", "shared", "long-chosen",
                                                                               "short-chosen"])
def test_each_ranks_segments_attend_what_the_whole_row_does(size, span):
    """Every rank's queries against the dense masked attention over the whole row, float64, values and gradients
    (keys and values gathered by hand here); padding positions of shared rows are zeros."""
    seed = new_seed()
    g = torch.Generator().manual_seed(seed)
    width = 13 if span is None else sum(span) + 2  # two padding positions after a shared row
    length = padded_length(width, size)
    heads, kv_heads, dim = 6, 2, 4
    q = torch.randn(1, heads, length, dim, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, kv_heads, length, dim, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, kv_heads, length, dim, generator=g, dtype=torch.float64, requires_grad=True)
    allowed = _dense_allowed(length, span, width)
    real = length if span is None else sum(span)
    allowed[real:, :] = False
    allowed[real:, real:] = torch.eye(length - real, dtype=torch.bool)  # padding: itself (no empty softmax row)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)
    expected = torch.where(torch.arange(length)[:, None] < real, expected, 0.0)
    got = torch.zeros_like(expected)
    for rank in range(size):
        plan = causal_plan(length, rank, size) if span is None else shared_plan(length, rank, size, span)
        where = local_positions(length, rank, size)
        got[:, :, where] = _plan_attention(q[:, :, where], k, v, plan, None, 0.0)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12, msg=lambda m: f"seed {seed}: {m}")
    grad = torch.randn(expected.shape, generator=g, dtype=torch.float64)
    want = torch.autograd.grad(expected, (q, k, v), grad)
    have = torch.autograd.grad(got, (q, k, v), grad)
    for name, a, b in zip("qkv", have, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m: f"d{name}, seed {seed}: {m}")


@pytest.mark.parametrize("share_prompt", [False, True])
def test_every_labelled_token_is_on_exactly_one_rank(share_prompt):
    """The packed labelled tokens of all ranks, put back by their global positions, are the batch's labels per
    sequence in order; each pair's last prompt position is held by exactly one rank."""
    from upo.train.data import collate

    batch = collate(checks.examples(new_seed(), 4), checks.PAD, False, share_prompt=share_prompt)
    rows = batch.shared.input_ids if share_prompt else batch.input_ids
    for size in (2, 3):
        per_sequence = [[] for _ in range(batch.labels.shape[0])]
        owners = torch.zeros(4, dtype=torch.long)
        for rank in range(size):
            part = split_rows(rows, batch.shared.position_ids if share_prompt else None, batch.labels,
                              batch.shared.source if share_prompt else None, batch.prompt_last_index, checks.PAD,
                              rank, size, spans=batch.shared.spans if share_prompt else None)
            offsets = part.cu_seqlens.tolist()
            for j in range(len(per_sequence)):
                per_sequence[j] += part.labels[offsets[j]:offsets[j + 1]].tolist()
            owners += (part.prompt_index >= 0).long()
        for j, labels in enumerate(per_sequence):
            expected = batch.labels[j][batch.labels[j] != -100].tolist()
            assert sorted(labels) == sorted(expected) and len(labels) == len(expected)
        assert owners.tolist() == [1] * 4


def spawn(world, tmp_path, check, *args):
    mp.spawn(check, args=(world, str(tmp_path / "init"), *args), nprocs=world, join=True)


CASES = {  # world: (share_prompt, loss) run in one launch of its processes
    2: [(False, "sigmoid"), (True, "ipo")],  # ipo divides by the token counts, which are summed over the ranks
    3: [(True, "sigmoid+upo"), (False, "sigmoid+upo")],
}


@pytest.mark.parametrize("world", CASES)
def test_split_sequences_train_as_whole_ones(world, tmp_path):
    """Loss, TRL's metrics and every parameter's gradient (value head included) of the split module, gradients
    summed over the ranks, equal the whole sequences' in float64 (a frozen reference model, grouped heads, uneven
    odd lengths padded; the unshared rows and prompt sharing's)."""
    spawn(world, tmp_path, checks.check_split_equals_whole, new_seed(), CASES[world])


def test_planted_faults_fail_the_check(tmp_path):
    """A missing reduction, a backward that multiplies by N, a position offset off by one, a rejected token that
    sees the chosen response: each is found by the check above."""
    spawn(2, tmp_path, checks.check_faults_are_caught, new_seed(),
          ["no_reduction", "backward_times_n", "position_off_by_one", "rejected_sees_chosen"])


@pytest.mark.real_model
def test_smollm2_split_over_three_processes_trains_as_whole_sequences(tmp_path):
    """SmolLM2's 9 query and 3 key-value heads over 3 ranks (each rank gathers the 3 key-value heads), fp32."""
    from real_model import require_real_model

    require_real_model()
    spawn(3, tmp_path, checks.check_smollm2, new_seed())
