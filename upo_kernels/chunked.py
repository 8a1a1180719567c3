"""Pure-PyTorch fused linear log-probs, chunked over tokens *and* vocabulary.

The CPU backend and the large-size oracle. Never builds a ``[tokens, vocab]`` tensor: the
largest temporary is one ``[chunk_tokens, chunk_vocab]`` logit tile (a few MB by default,
whatever the vocabulary size).

Forward, per token chunk: walk the vocabulary in tiles, reducing each to per-tile (max,
sum-exp) partials merged exactly, the target logit read from its tile; one pass with or without
token statistics, so the log-probs never depend on them. Backward recomputes
each tile and turns it into ``dz = g_t (onehot(y_t) - softmax(z_t))`` (chained through the
soft cap and the scale); the one-hot part is applied once per token as a sparse update.
"""
from __future__ import annotations

import itertools

import torch

from upo_kernels import buffers, token_stats

# 2048 x 384 fp32 tiles: 3 MB each, a handful of temporaries ~10 MB whatever V is. On a 2-core
# CPU (N = 16k, D = 256, V = 32000, fp32) they ran fwd+bwd ~10-15 % faster than 256 x 2048
# tiles (the grad_weight product sums over 2048 tokens instead of 256); 4 MB tiles were as
# fast only where the allocator keeps them (with MALLOC_MMAP_THRESHOLD_=4 MiB every one is a
# fresh mmap and slower).
DEFAULT_CHUNK_TOKENS = 2048
DEFAULT_CHUNK_VOCAB = 384
# Rows per chunk when the logits are given ([rows, V] fp32 temporaries).
LOGITS_CHUNK_ROWS = 256


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulate in fp32 at least (fp64 inputs stay fp64, which tests use)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _cap_logits(z, logit_scale, softcap):
    """``z <- softcap * tanh(logit_scale * z / softcap)`` in place (or just the scale)."""
    if logit_scale != 1.0:
        z.mul_(logit_scale)
    if softcap is not None:
        z.div_(softcap).tanh_().mul_(softcap)
    return z


def _logit_tile(h, w, b, logit_scale, softcap, out=None):
    if out is None:
        z = h @ w.t() if b is None else torch.addmm(b, h, w.t())
    else:
        z = torch.mm(h, w.t(), out=out) if b is None else torch.addmm(b, h, w.t(), out=out)
    return _cap_logits(z, logit_scale, softcap)


def _has_target(labels, keep, vocab):
    """Kept rows whose label is a row of this weight. A kept label outside ``[0, V)`` is another
    vocabulary shard's (``vocab_parallel.py``): the row counts in the normaliser and the
    statistics, its target logit is 0 here (logp = -lse) and its backward has no one-hot part."""
    return keep & (labels >= 0) & (labels < vocab)


def _target_logits(h, weight, bias, labels, has_target, logit_scale, softcap, dtype):
    """Final (scaled, capped) logit of each token's label (0 where ``has_target`` is False),
    without any vocab-wide tensor."""
    safe = torch.where(has_target, labels, torch.zeros_like(labels))
    z = (h * weight[safe].to(dtype)).sum(-1)
    if bias is not None:
        z = z + bias[safe].to(dtype)
    return torch.where(has_target, _cap_logits(z, logit_scale, softcap), torch.zeros_like(z))


def linear_logprobs_forward(hidden, weight, labels, bias=None, logit_scale=1.0, softcap=None,
                            ignore_index=-100, chunk_tokens=DEFAULT_CHUNK_TOKENS,
                            chunk_vocab=DEFAULT_CHUNK_VOCAB, stats=()):
    """hidden [N, D], weight [V, D], labels [N] -> (logp [N], lse [N]) in the compute dtype, and a
    third element ``{name: [N]}`` when ``stats`` (names of ``token_stats.STATS``) are asked.

    ``logp`` is 0 where ``labels == ignore_index``; ``lse`` is the log-normaliser of every row
    (kept for the backward pass).
    """
    # One path, whatever statistics are asked: the log-probs are bit-identical with and without them
    # (the policy's come with TRL's statistics, the reference's without).
    logp, lse, values = _tile_pass(hidden, weight, labels, bias, logit_scale, softcap, ignore_index, chunk_tokens,
                                   chunk_vocab, stats)
    return (logp, lse, values) if stats else (logp, lse)


def _tile_pass(hidden, weight, labels, bias, logit_scale, softcap, ignore_index, chunk_tokens, chunk_vocab, stats):
    """The forward, with or without token statistics: each ``[chunk, tile]`` logit tile is reduced to the
    per-slice partials of ``token_stats`` (all of them, whichever are asked: the cost is in the
    passes over the tile, not in the sums), merged exactly per token chunk.

    The logits ``z``, ``e = exp(z - max)`` and ones sit in one ``[3, chunk, tile]`` buffer, so
    one batched ``[e; 1] @ [z, e]`` product gives ``sum e z``, ``sum e^2``, ``sum z`` and
    ``sum e`` per row in one pass (``u = sum e z - max * sum e``, as TRL's head computes it).
    Per tile that is five passes (product, max, subtract, exp, batched product) into reused
    buffers, and a copy of the logits of the rows whose label falls in the tile: their label
    logit and the max left of it are read from those copies once per chunk (so is_top1 compares
    the label's logit with the max bit for bit). Few calls per tile: at 2048 x 384 tiles on a
    CPU, each torch call's overhead is a measurable share of the work."""
    n_tokens, vocab = hidden.shape[0], weight.shape[0]
    dtype, device = compute_dtype(hidden.dtype), hidden.device
    logp = buffers.empty((n_tokens,), dtype, device)
    lse = buffers.empty((n_tokens,), dtype, device)
    values = {name: buffers.empty((n_tokens,), dtype, device) for name in stats}
    tiles = -(-vocab // chunk_vocab)
    # -inf logits (a -inf bias without soft cap) need guards against 0 * -inf; nothing else makes them
    minus_inf = bias is not None and softcap is None and bool(torch.isneginf(bias).any())
    for t0 in range(0, n_tokens, chunk_tokens):
        t1 = min(t0 + chunk_tokens, n_tokens)
        h, y = hidden[t0:t1].to(dtype), labels[t0:t1]
        # per tile: the max and [[sum e z, sum e^2], [sum z, sum e]] of each row, tile-major
        part_max = buffers.empty((tiles, t1 - t0), dtype, device)
        sums = buffers.empty((tiles, t1 - t0, 2, 2), dtype, device)
        stack = torch.empty((3, t1 - t0, min(chunk_vocab, vocab)), dtype=dtype, device=device)
        stack[2].fill_(1.0)
        label_tile, order, bounds = _rows_by_label_tile(y, chunk_vocab, tiles, vocab)
        label_rows = []  # per tile, the logits of the rows whose label is in it
        views = _tile_views(stack, stack.shape[2])
        for j, v0 in enumerate(range(0, vocab, chunk_vocab)):
            v1 = min(v0 + chunk_vocab, vocab)
            if v1 - v0 != stack.shape[2]:
                views = _tile_views(stack, v1 - v0)
            z, e, lhs, rhs = views
            w = weight[v0:v1] if weight.dtype == dtype else weight[v0:v1].to(dtype)
            _logit_tile(h, w, None if bias is None else bias[v0:v1].to(dtype), logit_scale, softcap, out=z)
            m = torch.amax(z, dim=1, out=part_max[j])
            if bounds[j + 1] > bounds[j]:
                label_rows.append(z.index_select(0, order[bounds[j]:bounds[j + 1]]))
            if minus_inf:
                m.clamp_(min=torch.finfo(dtype).min)  # a row of -inf logits: e = 0
            torch.sub(z, m.unsqueeze(1), out=e).exp_()
            torch.bmm(lhs, rhs, out=sums[j])
            if minus_inf:
                _fix_minus_inf(sums[j, :, 0, 0], e, z)
        parts = buffers.empty((len(token_stats.STATS), t1 - t0, tiles), dtype, device)
        part_sum = sums[:, :, 1, 1].t()
        parts[_ROW["entropy"]] = sums[:, :, 0, 0].t() - part_max.t() * part_sum
        parts[_ROW["log_sum_sq_probs"]] = sums[:, :, 0, 1].t()
        parts[_ROW["mean_logits"]] = sums[:, :, 1, 0].t()
        target = _label_parts(label_rows, y, label_tile, order[bounds[0]:bounds[-1]], chunk_vocab, part_max,
                              parts[_ROW["is_top1"]])
        part_tgt = torch.zeros((t1 - t0, tiles), dtype=dtype, device=device)
        part_tgt[:, 0] = target  # one slice holds the label's logit: the merge only sums them
        merged = token_stats.merge_parts(part_max.t(), part_sum, part_tgt, y, ignore_index, parts, stats, vocab)
        logp[t0:t1], lse[t0:t1] = merged[:2]
        for name, v in (merged[2] if stats else {}).items():
            values[name][t0:t1] = v
    return logp, lse, values


_ROW = token_stats.STAT_ROW


def _tile_views(stack, cols):
    """(z, e, [e; 1] as [rows, 2, cols], [z, e] as [rows, cols, 2]) over the first ``cols`` columns."""
    tile = stack[:, :, :cols]
    return tile[0], tile[1], tile[1:].permute(1, 0, 2), tile[:2].permute(1, 2, 0)


def _rows_by_label_tile(y, chunk_vocab, tiles, vocab):
    """Each row's label tile (-1 for labels outside ``[0, V)``: ignored, or another shard's), the
    rows sorted by it and, per tile ``j``, its rows' span ``order[bounds[j]:bounds[j + 1]]`` (one
    host sync)."""
    inside = (y >= 0) & (y < vocab)
    label_tile = torch.where(inside, torch.div(y, chunk_vocab, rounding_mode="floor"), -1)
    order = torch.argsort(label_tile, stable=True)
    counts = torch.bincount(label_tile + 1, minlength=tiles + 1).tolist()
    bounds = list(itertools.accumulate(counts))  # bounds[0]: the rows without a tile
    return label_tile, order, bounds


def _label_parts(label_rows, y, label_tile, rows, chunk_vocab, part_max, before):
    """From the kept logits of each row whose label has a tile (``rows``, in tile order): its label
    logit (returned, 0 for the others) and the max logit left of the label into ``before``
    [rows, tiles] (the maxima of the tiles left of the label's tile, and of its own part)."""
    tiles = part_max.shape[0]
    left_tiles = torch.arange(tiles, device=y.device).unsqueeze(0) < label_tile.unsqueeze(1)
    before.copy_(torch.where(left_tiles, part_max.t(), float("-inf")))
    target = torch.zeros_like(part_max[0])
    if not rows.numel():
        return target
    width = max(z.shape[1] for z in label_rows)
    z = torch.cat([torch.nn.functional.pad(z, (0, width - z.shape[1]), value=float("-inf")) for z in label_rows])
    local = (y.index_select(0, rows) - label_tile.index_select(0, rows) * chunk_vocab).unsqueeze(1)
    target[rows] = z.gather(1, local).squeeze(1)
    left = torch.arange(width, device=z.device).unsqueeze(0) < local
    before[rows, label_tile.index_select(0, rows)] = z.masked_fill(~left, float("-inf")).amax(dim=1)
    return target


def _fix_minus_inf(ez, e, z):
    """``sum e z`` per row (in place), where ``e = 0, z = -inf`` (a -inf logit) must add 0, not NaN."""
    bad = torch.isnan(ez).nonzero().squeeze(1)
    if bad.numel():
        e_bad, z_bad = e.index_select(0, bad), z.index_select(0, bad)
        ez[bad] = torch.where(e_bad > 0, e_bad * z_bad, torch.zeros_like(e_bad)).sum(dim=1)


def _cap_derivative(z_capped, softcap):
    """d(capped)/d(uncapped) expressed through the capped value: 1 - tanh^2."""
    return 1.0 - (z_capped / softcap) ** 2


def _add_onehot_part(grad_h, grad_w, grad_b, h, g, labels, keep, weight, bias, logit_scale, softcap, dtype):
    """+ g_t * d(target logit)/d(raw target logit) for the kept tokens of one chunk whose label is
    a row of ``weight`` (``grad_h``: the chunk's rows)."""
    rows = _has_target(labels, keep, weight.shape[0]).nonzero().squeeze(1)
    y = labels[rows]
    h_kept = h[rows]
    coef = g[rows] * logit_scale
    if softcap is not None:
        z_target = _target_logits(h_kept, weight, bias, y, torch.ones_like(keep[rows]), logit_scale,
                                  softcap, dtype)
        coef = coef * _cap_derivative(z_target, softcap)
    grad_h.index_add_(0, rows, coef.unsqueeze(1) * weight[y].to(dtype))
    if grad_w is not None:
        grad_w.index_add_(0, y, coef.unsqueeze(1) * h_kept)
    if grad_b is not None:
        grad_b.index_add_(0, y, coef)


def linear_logprobs_backward(grad_logp, hidden, weight, labels, lse, bias=None, logit_scale=1.0,
                             softcap=None, ignore_index=-100, chunk_tokens=DEFAULT_CHUNK_TOKENS,
                             chunk_vocab=DEFAULT_CHUNK_VOCAB, needs_weight_grad=True,
                             needs_bias_grad=True, needs_hidden_grad=True, rows=None):
    """Gradients of ``sum_t grad_logp[t] * logp[t]`` -> (grad_hidden, grad_weight, grad_bias).

    ``rows`` (int64 [M], optional): token ``t`` of ``grad_logp``/``labels``/``lse`` is row
    ``rows[t]`` of ``hidden`` (which may have more rows: those get zero gradient). Returned in
    the compute dtype (fp32/fp64), None where not needed; the caller casts to the parameters'
    dtypes.
    """
    n_tokens, vocab = labels.shape[0], weight.shape[0]
    dtype = compute_dtype(hidden.dtype)
    keep = labels != ignore_index
    g = torch.where(keep, grad_logp.to(dtype), torch.zeros((), dtype=dtype, device=hidden.device))
    grad_h = torch.zeros((hidden.shape[0], hidden.shape[1]), dtype=dtype, device=hidden.device) \
        if needs_hidden_grad else None
    grad_w = torch.zeros(weight.shape, dtype=dtype, device=hidden.device) if needs_weight_grad else None
    want_b = bias is not None and needs_bias_grad
    grad_b = torch.zeros((vocab,), dtype=dtype, device=hidden.device) if want_b else None

    for t0 in range(0, n_tokens, chunk_tokens):
        t1 = min(t0 + chunk_tokens, n_tokens)
        g_c = g[t0:t1]
        if not bool(g_c.any()):
            continue  # prompt/padding chunk: contributes nothing
        h = (hidden[t0:t1] if rows is None else hidden.index_select(0, rows[t0:t1])).to(dtype)
        gh_c = torch.zeros_like(h)
        lse_c = lse[t0:t1].unsqueeze(1)
        for v0 in range(0, vocab, chunk_vocab):
            v1 = min(v0 + chunk_vocab, vocab)
            w = weight[v0:v1].to(dtype)
            b = None if bias is None else bias[v0:v1].to(dtype)
            z = _logit_tile(h, w, b, logit_scale, softcap)
            # softmax part of dlogp/dz, scaled by -g; the one-hot part is added below
            dz = torch.sub(z, lse_c).exp_().mul_(-g_c.unsqueeze(1))
            if softcap is not None:
                dz.mul_(_cap_derivative(z, softcap))
            if logit_scale != 1.0:
                dz.mul_(logit_scale)
            if grad_h is not None:
                gh_c.addmm_(dz, w)
            if grad_w is not None:
                grad_w[v0:v1].addmm_(dz.t(), h)
            if grad_b is not None:
                grad_b[v0:v1] += dz.sum(0)
        _add_onehot_part(gh_c, grad_w, grad_b, h, g_c, labels[t0:t1], keep[t0:t1], weight, bias, logit_scale,
                         softcap, dtype)
        if grad_h is None:
            continue
        if rows is None:
            grad_h[t0:t1] = gh_c
        else:
            grad_h.index_copy_(0, rows[t0:t1], gh_c)

    return grad_h, grad_w, grad_b


def logprobs_from_logits_forward(logits, labels, ignore_index=-100, chunk_tokens=LOGITS_CHUNK_ROWS):
    """logits [N, V], labels [N] -> (logp [N], lse [N]); chunked over tokens, fp32 math."""
    n_tokens = logits.shape[0]
    dtype = compute_dtype(logits.dtype)
    logp = buffers.empty((n_tokens,), dtype, logits.device)
    lse = buffers.empty((n_tokens,), dtype, logits.device)
    keep = labels != ignore_index
    safe = torch.where(keep, labels, torch.zeros_like(labels))
    for t0 in range(0, n_tokens, chunk_tokens):
        t1 = min(t0 + chunk_tokens, n_tokens)
        z = logits[t0:t1].to(dtype)
        lse[t0:t1] = torch.logsumexp(z, dim=1)
        target = z.gather(1, safe[t0:t1].unsqueeze(1)).squeeze(1)
        logp[t0:t1] = torch.where(keep[t0:t1], target - lse[t0:t1], torch.zeros_like(target))
    return logp, lse


def logprobs_from_logits_backward(grad_logp, logits, labels, lse, ignore_index=-100,
                                  chunk_tokens=LOGITS_CHUNK_ROWS):
    """Gradient w.r.t. logits, in the logits' dtype: ``g_t (onehot(y_t) - softmax(z_t))``."""
    dtype = compute_dtype(logits.dtype)
    keep = labels != ignore_index
    g = torch.where(keep, grad_logp.to(dtype), torch.zeros((), dtype=dtype, device=logits.device))
    safe = torch.where(keep, labels, torch.zeros_like(labels))
    grad = torch.empty_like(logits)
    for t0 in range(0, logits.shape[0], chunk_tokens):
        t1 = min(t0 + chunk_tokens, logits.shape[0])
        dz = (logits[t0:t1].to(dtype) - lse[t0:t1].unsqueeze(1)).exp_().mul_(-g[t0:t1].unsqueeze(1))
        dz.scatter_add_(1, safe[t0:t1].unsqueeze(1), g[t0:t1].unsqueeze(1))
        grad[t0:t1] = dz
    return grad
