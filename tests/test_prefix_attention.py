"""prefix_causal_attention (upo_kernels/prefix_attention.py): a block of queries over a prefix (every key) and its
own keys (causally), against a float64 reference that builds the scores and the mask; values and gradients, odd
shapes, grouped-query heads, bf16 no worse than the masked SDPA call it replaces, bad shapes refused in one line."""
import math

import pytest
import torch

from helpers import new_seed, rel_err
import upo_kernels.prefix_attention as prefix_attention
from upo_kernels.prefix_attention import (prefix_causal_attention, prefix_causal_attention_lower_right,
                                          prefix_causal_attention_masked)


def reference(query, prefix_key, prefix_value, key, value, scale=None):
    """float64 scores of [prefix, block], masked by hand (prefix all, block causal), softmax, weighted values."""
    query, keys, values = query.double(), torch.cat([prefix_key, key], 2).double(), torch.cat([prefix_value, value],
                                                                                             2).double()
    groups = query.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(groups, 1), values.repeat_interleave(groups, 1)
    prefix, blocks = prefix_key.shape[2], key.shape[2]
    scores = query @ keys.transpose(-1, -2) * (scale if scale is not None else 1 / math.sqrt(query.shape[-1]))
    allowed = torch.ones(blocks, prefix + blocks, dtype=torch.bool)
    for i in range(blocks):
        allowed[i, prefix + i + 1:] = False
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ values


def random_inputs(seed, batch, heads, kv_heads, prefix, blocks, head_dim=24, dtype=torch.float32):
    """query/key/value as transformers makes them: [B, S, H, d] transposed to [B, H, S, d] (not contiguous)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, prefix + blocks, heads, head_dim, generator=g).transpose(1, 2)
    k = torch.randn(batch, prefix + blocks, kv_heads, head_dim, generator=g).transpose(1, 2)
    v = torch.randn(batch, prefix + blocks, kv_heads, head_dim, generator=g).transpose(1, 2)
    return [t.to(dtype).requires_grad_() for t in (q, k, v)]


def split(q, k, v, prefix):
    return q[:, :, prefix:], k[:, :, :prefix], v[:, :, :prefix], k[:, :, prefix:], v[:, :, prefix:]


SHAPES = [  # batch, heads, kv_heads, prefix, block
    (1, 4, 4, 37, 23),
    (2, 6, 2, 5, 41),     # grouped heads, a block longer than its prefix
    (1, 3, 1, 130, 1),    # one query
    (1, 2, 2, 1, 7),      # one prefix key
    (1, 4, 2, 0, 9),      # no prefix: plain causal attention
]


IMPLS = {"split": prefix_causal_attention, "masked": prefix_causal_attention_masked,
         # CUDA's masked kernel takes no grouped heads, so the fallback repeats keys and values there: that branch,
         # run on CPU (a wrong repeat, e.g. tiled instead of interleaved, fails)
         "masked-repeated-heads-as-on-cuda": prefix_causal_attention_masked,
         # the branch off CPU (CUDA, dropout): SDPA with a bottom-right causal bias, forced here; and with the heads
         # repeated, as on a torch whose CausalBias takes no grouped heads
         "lower-right-as-on-cuda": prefix_causal_attention_lower_right,
         "lower-right-repeated-heads": prefix_causal_attention_lower_right}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
def test_values_and_gradients_against_float64(monkeypatch, shape, impl):
    if impl == "masked-repeated-heads-as-on-cuda":
        monkeypatch.setattr(prefix_attention, "masked_kernel_takes_grouped_heads", lambda device: False)
    if impl == "lower-right-repeated-heads":
        monkeypatch.setattr(prefix_attention, "causal_bias_takes_grouped_heads", lambda: False)
    seed = new_seed()
    batch, heads, kv_heads, prefix, blocks = shape
    q, k, v = random_inputs(seed, batch, heads, kv_heads, prefix, blocks)
    scale = 0.3 if blocks % 2 else None  # the model's own scaling, and SDPA's default
    out = IMPLS[impl](*split(q, k, v, prefix), scale=scale)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    expected = reference(*split(q64, k64, v64, prefix), scale=scale)
    assert out.shape == expected.shape and out.dtype == q.dtype
    assert rel_err(out, expected) < 1e-5, f"seed {seed}"
    grad = torch.randn(expected.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    out.backward(grad.float())
    expected.backward(grad)
    for name, got, want in (("query", q, q64), ("key", k, k64), ("value", v, v64)):
        assert rel_err(got.grad, want.grad) < 1e-5, f"d{name}, seed {seed}"


def test_bf16_is_no_worse_than_the_masked_sdpa_call():
    """In bf16 the merge of the two halves (in fp32, then rounded once) is as close to float64 as SDPA's own masked
    kernel: values and every gradient within 1.25x its error."""
    seed = new_seed()
    prefix, blocks = 96, 40
    errors = {}
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in random_inputs(seed, 1, 6, 2, prefix, blocks))
    expected = reference(*split(q64, k64, v64, prefix))
    grad = torch.randn(expected.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    expected.backward(grad)
    for impl in (prefix_causal_attention, prefix_causal_attention_masked):
        q, k, v = (t.detach().to(torch.bfloat16).requires_grad_() for t in (q64, k64, v64))
        out = impl(*split(q, k, v, prefix))
        out.backward(grad.to(torch.bfloat16))
        errors[impl.__name__] = [rel_err(out, expected)] + [rel_err(a.grad, b.grad)
                                                            for a, b in ((q, q64), (k, k64), (v, v64))]
    split_errors, masked_errors = errors["prefix_causal_attention"], errors["prefix_causal_attention_masked"]
    assert max(split_errors) < 2e-2, f"seed {seed}: {split_errors}"
    for got, baseline in zip(split_errors, masked_errors):
        assert got <= 1.25 * baseline + 1e-3, f"seed {seed}: {split_errors} against {masked_errors}"


def test_cpu_path_builds_no_mask_and_no_key_copy(monkeypatch):
    """On CPU the two halves run on the flash kernels: SDPA (which would take the mask) is never called."""
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: pytest.fail("masked SDPA called"))
    q, k, v = random_inputs(new_seed(), 1, 4, 2, 11, 6)
    prefix_causal_attention(*split(q, k, v, 11)).sum().backward()


@pytest.mark.parametrize("bad, message", [
    (lambda q, pk, pv, k, v: (q[0], pk, pv, k, v), r"query must be \[batch, heads, tokens, head_dim\]"),
    (lambda q, pk, pv, k, v: (q, pk[..., :5], pv, k, v), r"prefix_key must be \[1, kv_heads, tokens, 8\]"),
    (lambda q, pk, pv, k, v: (q, pk, pv[:, :, :2], k, v), "prefix_value must have 3 tokens, got 2"),
    (lambda q, pk, pv, k, v: (q, pk, pv, k[:, :, :1], v), "key must have 4 tokens, got 1"),
    (lambda q, pk, pv, k, v: (q, pk, pv, k, v[:, :1]), "value has 1 heads"),
    (lambda q, pk, pv, k, v: (q[:, :3], pk, pv, k, v), "divide the query's 3"),
    (lambda q, pk, pv, k, v: (q, pk, pv, k, v.double()), "value is torch.float64 on cpu, query torch.float32"),
])
def test_bad_shapes_are_refused_in_one_line(bad, message):
    q, k, v = torch.zeros(1, 4, 7, 8), torch.zeros(1, 2, 7, 8), torch.zeros(1, 2, 7, 8)
    with pytest.raises(ValueError, match=message) as err:
        prefix_causal_attention(*bad(*split(q, k, v, 3)))
    assert "\n" not in str(err.value)


def test_autocast_casts_every_input_as_it_does_for_sdpa():
    """Under autocast a model may hand fp32 rotated queries beside bf16 values (the TRL default, bf16=True): both
    paths compute in autocast's dtype, as close to float64 as each other, and the fp32 query gets an fp32 gradient."""
    seed = new_seed()
    prefix, blocks = 29, 17
    q, k, v = random_inputs(seed, 1, 4, 2, prefix, blocks)
    q64, k64, v64 = (t.detach().double() for t in (q, k, v))
    expected = reference(*split(q64, k64, v64, prefix))
    errors = []
    for impl in (prefix_causal_attention, prefix_causal_attention_masked):
        query = q.detach().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = impl(*split(query, k.detach().bfloat16(), v.detach().bfloat16(), prefix))
        assert out.dtype == torch.bfloat16
        out.float().sum().backward()
        assert query.grad.dtype == torch.float32 and torch.isfinite(query.grad).all()
        errors.append(rel_err(out, expected))
    assert errors[0] <= 1.25 * errors[1] + 1e-3, f"seed {seed}: {errors}"
