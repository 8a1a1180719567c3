"""What ``upo.fused_loss`` hands ``upo.loss`` for WPO and LD-DPO, and the token metrics it logs.

``upo.loss`` takes the per-sequence quantities (``chosen_wpo_weights``, ``chosen_shared_logps``,
...) by contract with the losses; these tests check the supplying side by capturing what
``fused_loss`` passes (``upo.fused.loss`` wrapped), against a float64 recomputation from
per-token values on the materialised logits, written the way TRL 1.16's ``DPOTrainer`` writes
it, for padded ``[2B, T, D]`` and packed ``[N, D]`` + ``cu_seqlens`` batches.
"""
from __future__ import annotations

import pytest
import torch

import upo
import upo.fused
from helpers import assert_close_rel, leaf, make_pref_batch, new_seed, pack
from upo_kernels import reference
from upo_kernels.buffers import poison_outputs

ON_CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(ON_CUDA, reason="CPU interpreter sizes")
CONTRACT = ("use_weighting", "ld_alpha", "chosen_wpo_weights", "rejected_wpo_weights", "chosen_shared_logps",
            "rejected_shared_logps", "ref_chosen_shared_logps", "ref_rejected_shared_logps")
LOGIT_KW = dict(logit_scale=0.8, softcap=6.0)


@pytest.fixture
def captured(monkeypatch):
    """``upo.fused.loss`` wrapped: records its keyword arguments, runs the real loss without the
    contract's new arguments (they land with the losses' side)."""
    calls = []
    real = upo.fused.loss

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **{k: v for k, v in kwargs.items() if k not in CONTRACT})

    monkeypatch.setattr(upo.fused, "loss", spy)
    return calls


def batch_with_top1(b, t, d, v, seed, **kw):
    """A padded batch whose response labels alternate between the argmax and the argmin of the
    logits (mean_token_accuracy ~ 0.5, and strictly between 0 and 1)."""
    batch = make_pref_batch(b, t, d, v, seed=seed, bias=True, min_prompt=1, **kw)
    z = reference.reference_logits(batch.hidden, batch.weight, batch.bias, **LOGIT_KW)
    keep = batch.labels != -100
    even = keep & (keep.cumsum(dim=1) % 2 == 1)
    batch.labels[even] = z.argmax(-1)[even]
    batch.labels[keep & ~even] = z.argmin(-1)[keep & ~even]
    return batch


def oracle(batch, hidden=None):
    """float64 per-sequence quantities from per-token values, TRL 1.16's way (padded layout)."""
    h = batch.hidden if hidden is None else hidden
    logp = reference.reference_token_logprobs(h, batch.weight, batch.labels, batch.bias, **LOGIT_KW)
    stats = reference.reference_token_stats(h, batch.weight, batch.labels, batch.bias, **LOGIT_KW)
    mask = (batch.labels != -100).double()
    half = mask.shape[0] // 2
    comp_pos = mask.cumsum(dim=1)
    comp_lens = mask.sum(dim=1).long()
    shared_lens = torch.minimum(comp_lens[:half], comp_lens[half:]).repeat(2)
    shared_mask = (comp_pos > 0) & (comp_pos <= shared_lens.unsqueeze(1))
    shared = (logp * shared_mask).sum(1)
    weights = torch.exp(((logp - stats["log_sum_sq_probs"]) * mask).sum(1) / mask.sum(1).clamp_min(1))
    metrics = {"entropy": (stats["entropy"] * mask).sum() / mask.sum(),
               "mean_token_accuracy": (stats["is_top1"] * mask)[:half].sum() / mask[:half].sum(),
               "logits/chosen": (stats["mean_logits"] * mask)[:half].sum() / mask[:half].sum(),
               "logits/rejected": (stats["mean_logits"] * mask)[half:].sum() / mask[half:].sum()}
    return {"shared": shared, "weights": weights, "metrics": metrics, "half": half}


def run_fused(batch, packed, backend="torch", **kw):
    h = leaf(batch.hidden)
    hidden, labels = h, batch.labels
    if packed:
        hidden, labels, kw["cu_seqlens"] = pack(h, batch.labels, batch.lengths)
        if "ref_hidden" in kw:
            kw["ref_hidden"] = pack(kw["ref_hidden"], batch.labels, batch.lengths)[0]
    with poison_outputs():
        out = upo.fused_loss(hidden, batch.weight, labels, bias=batch.bias, backend=backend, **LOGIT_KW, **kw)
    return out, h


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_wpo_and_ld_quantities(captured, backend, packed):
    """WPO weights (detached) and LD shared-prefix sums (with gradient), policy and reference from
    ``ref_hidden``, against float64; the shared sums' gradient too."""
    seed = new_seed()
    batch = batch_with_top1(3, 9, 16, 97, seed)
    out, h = run_fused(batch, packed, backend, ref_hidden=batch.ref_hidden, loss_type="sigmoid", use_weighting=True,
                       ld_alpha=0.5)
    kw = captured[-1]
    assert kw["use_weighting"] is True and kw["ld_alpha"] == 0.5, "the loss options reach upo.loss"
    ref, ref_ref = oracle(batch), oracle(batch, batch.ref_hidden)
    half = ref["half"]
    for side, sl in (("chosen", slice(0, half)), ("rejected", slice(half, None))):
        weights = kw[f"{side}_wpo_weights"]
        assert weights.shape == (half,) and not weights.requires_grad
        assert_close_rel(weights, ref["weights"][sl], 1e-5, f"{side}_wpo_weights", seed)
        assert_close_rel(kw[f"{side}_shared_logps"].detach(), ref["shared"][sl], 1e-5, f"{side}_shared_logps", seed)
        assert not kw[f"ref_{side}_shared_logps"].requires_grad
        assert_close_rel(kw[f"ref_{side}_shared_logps"], ref_ref["shared"][sl], 1e-5, f"ref_{side}_shared", seed)
    (kw["chosen_shared_logps"].sum() + 2 * kw["rejected_shared_logps"].sum()).backward()
    h64 = leaf(batch.hidden, torch.float64)
    o64 = oracle(batch, h64)
    (o64["shared"][:half].sum() + 2 * o64["shared"][half:].sum()).backward()
    grad = h.grad
    assert_close_rel(grad, h64.grad, 1e-4, "grad of the shared sums", seed)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_token_metrics(captured, packed):
    seed = new_seed()
    batch = batch_with_top1(3, 11, 16, 89, seed)
    out, _ = run_fused(batch, packed, loss_type="sigmoid", token_stats=True,
                       ref_chosen_logps=torch.zeros(3), ref_rejected_logps=torch.zeros(3))
    expected = oracle(batch)["metrics"]
    if ((batch.labels[:3] != -100).sum(1) >= 2).any():  # alternating per row: both kinds among the chosen
        assert 0 < expected["mean_token_accuracy"] < 1, "the batch must have right and wrong top-1 tokens"
    for name, value in expected.items():
        assert isinstance(out.metrics[name], float)
        assert abs(out.metrics[name] - float(value)) <= 1e-5 * (1 + abs(float(value))), f"{name} (seed={seed})"
    assert "rewards/accuracies" in out.metrics, "upo.loss's own metrics stay"
    assert not any(k in captured[-1] for k in CONTRACT), "nothing of WPO/LD without their options"
    plain, _ = run_fused(batch, packed, loss_type="sigmoid", ref_chosen_logps=torch.zeros(3),
                         ref_rejected_logps=torch.zeros(3))
    assert not set(expected) & set(plain.metrics), "token metrics only when asked"


def test_precomputed_reference_with_ld(captured):
    """Precomputed reference sums: LD needs the reference's shared sums too; they pass through."""
    seed = new_seed()
    batch = batch_with_top1(2, 8, 12, 61, seed)
    refs = dict(ref_chosen_logps=torch.zeros(2), ref_rejected_logps=torch.zeros(2))
    with pytest.raises(ValueError, match="ref_chosen_shared_logps"):
        run_fused(batch, False, loss_type="sigmoid", ld_alpha=0.3, **refs)
    shared = dict(ref_chosen_shared_logps=torch.full((2,), -1.0), ref_rejected_shared_logps=torch.full((2,), -2.0))
    run_fused(batch, False, loss_type="sigmoid", ld_alpha=0.3, **refs, **shared)
    assert torch.equal(captured[-1]["ref_chosen_shared_logps"], shared["ref_chosen_shared_logps"])
    assert torch.equal(captured[-1]["ref_rejected_shared_logps"], shared["ref_rejected_shared_logps"])
    with pytest.raises(ValueError, match="ld_alpha"):
        run_fused(batch, False, loss_type="sigmoid", **refs, **shared)
    with pytest.raises(ValueError, match="ref_rejected_shared_logps is missing"):
        run_fused(batch, False, loss_type="sigmoid", ld_alpha=0.3, **refs,
                  ref_chosen_shared_logps=shared["ref_chosen_shared_logps"])
    with pytest.raises(ValueError, match="either ref_hidden"):
        run_fused(batch, False, loss_type="sigmoid", ld_alpha=0.3, ref_hidden=batch.ref_hidden, **shared)


def test_sequence_logprobs_stats():
    """``sequence_logprobs(..., stats=...)``: per-sequence sums of each statistic, padded = packed."""
    seed = new_seed()
    batch = batch_with_top1(2, 10, 12, 73, seed)
    sums, counts, stat_sums = upo.sequence_logprobs(batch.hidden, batch.weight, batch.labels, bias=batch.bias,
                                                    stats=("entropy", "is_top1"), **LOGIT_KW)
    ref = reference.reference_token_stats(batch.hidden, batch.weight, batch.labels, batch.bias, **LOGIT_KW)
    assert tuple(stat_sums) == ("entropy", "is_top1")
    for name, value in stat_sums.items():
        assert_close_rel(value, ref[name].sum(1), 1e-5, name, seed)
    hp, lp, cu = pack(batch.hidden, batch.labels, batch.lengths)
    _, counts_p, packed = upo.sequence_logprobs(hp, batch.weight, lp, cu_seqlens=cu, bias=batch.bias,
                                                stats=("entropy", "is_top1"), **LOGIT_KW)
    assert torch.equal(counts, counts_p)
    for name in stat_sums:
        assert_close_rel(packed[name], stat_sums[name], 1e-6, f"packed {name}", seed)
    assert len(upo.sequence_logprobs(batch.hidden, batch.weight, batch.labels)) == 2
    with pytest.raises(ValueError, match="stats"):
        upo.sequence_logprobs(batch.hidden, batch.weight, batch.labels, stats=("accuracy",))
