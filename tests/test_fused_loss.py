"""``upo.fused_loss`` / ``upo.fused.sequence_logprobs`` against ``upo.loss`` over float64 reference sums.

Oracle: per-sequence sums S and counts n from ``reference_sequence_logprobs`` in float64 (autograd
through the naive formulas), fed to ``upo.loss`` in float64. The fused path (fp32 inputs) must agree
to rel. error 1e-5 on loss values and 1e-4 on gradients w.r.t. hidden, weight and bias.
"""
from __future__ import annotations

import pytest
import torch

import upo
from helpers import (TOL_GRAD, TOL_OUT, assert_close_rel, gen, leaf, make_pref_batch, new_seed, pack, rel_err)
from upo.fused import sequence_logprobs
from upo_kernels import reference
from upo_kernels.buffers import poison_outputs

ON_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if ON_CUDA else "cpu"

ALL_LOSSES = upo.available_losses()


def loss_kwargs_for(loss_type, b, seed, *, with_values=True):
    """Per-loss arguments: aux rewards (and values) for ``upo``; a beta giving O(1) margins."""
    names = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    kw = dict(loss_type=loss_type, beta=0.1)
    if "exo_pair" in names:  # log(eps): needs label_smoothing > 0
        kw["label_smoothing"] = 1e-3
    if "mrpo" in names:  # one further reference model
        g = gen(seed + 11)
        kw["extra_ref_chosen_logps"] = -(1 + 40 * torch.rand(b, 1, generator=g)).to(DEVICE)
        kw["extra_ref_rejected_logps"] = -(1 + 40 * torch.rand(b, 1, generator=g)).to(DEVICE)
    if any(upo.loss_spec(n).needs_aux_rewards for n in names):
        g = gen(seed + 7)
        kw["aux_rewards_chosen"] = torch.randn(b, 2, generator=g).to(DEVICE)
        kw["aux_rewards_rejected"] = torch.randn(b, 2, generator=g).to(DEVICE)
        if with_values:
            kw["values_chosen"] = torch.randn(b, generator=g).to(DEVICE)
    return kw


def needs_reference(loss_type):
    names = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    return any(upo.loss_spec(n).needs_reference for n in names)


def reference_refs(batch, **logit_kw):
    """Float64 reference-model sums from ``batch.ref_hidden`` (same weight): (R_c, R_r)."""
    with torch.no_grad():
        r, _ = reference.reference_sequence_logprobs(batch.ref_hidden, batch.weight, batch.labels, batch.bias,
                                                     **logit_kw)
    b = r.shape[0] // 2
    return r[:b], r[b:]


def reference_loss(batch, loss_kw, refs=None, **logit_kw):
    """upo.loss over float64 reference sums; returns (LossOutput, grads [hidden, weight, bias])."""
    h = leaf(batch.hidden, torch.float64)
    w = leaf(batch.weight, torch.float64)
    bb = leaf(batch.bias, torch.float64)
    s, n = reference.reference_sequence_logprobs(h, w, batch.labels, bb, **logit_kw)
    b = s.shape[0] // 2
    rc, rr = (None, None) if refs is None else refs
    out = upo.loss(s[:b], s[b:], rc, rr, chosen_lengths=n[:b], rejected_lengths=n[b:], **loss_kw)
    out.loss.backward()
    return out, [h.grad, w.grad, None if bb is None else bb.grad]


def fused(batch, loss_kw, backend, refs=None, use_ref_hidden=False, packed=False, explicit_ref_bias=True,
          **logit_kw):
    """upo.fused_loss on fp32 leaves; packed=True packs the (leaf) padded hidden, so grads stay [2B, T, D].

    use_ref_hidden: the reference model is ``batch.ref_hidden`` with the same head (weight, bias); the
    bias is passed explicitly as ``ref_bias`` unless ``explicit_ref_bias=False``.
    """
    h, w, bb = leaf(batch.hidden), leaf(batch.weight), leaf(batch.bias)
    kw = dict(loss_kw)
    hidden, labels, cu = h, batch.labels, None
    if packed:
        hidden, labels, cu = pack(h, batch.labels, batch.lengths)
        kw["cu_seqlens"] = cu
    if use_ref_hidden:
        rh = batch.ref_hidden
        kw["ref_hidden"] = pack(rh, batch.labels, batch.lengths)[0] if packed else rh
        if explicit_ref_bias and batch.bias is not None:
            kw["ref_bias"] = batch.bias
    elif refs is not None:
        kw["ref_chosen_logps"], kw["ref_rejected_logps"] = (r.float() for r in refs)
    with poison_outputs():
        out = upo.fused_loss(hidden, w, labels, bias=bb, backend=backend, **kw, **logit_kw)
        out.loss.backward()
    return out, [h.grad, w.grad, None if bb is None else bb.grad]


def compare(out, grads, ref_out, ref_grads, seed, what=""):
    tag = f"{what} " if what else ""
    assert out.loss.dtype == torch.float32, f"{tag}loss dtype {out.loss.dtype}"
    assert out.loss.dim() == 0
    assert_close_rel(out.loss.detach(), ref_out.loss.detach(), TOL_OUT, f"{tag}loss", seed)
    assert out.losses.shape == ref_out.losses.shape
    assert_close_rel(out.losses.detach(), ref_out.losses.detach(), TOL_OUT, f"{tag}per-pair losses", seed)
    assert set(out.terms) == set(ref_out.terms), f"{tag}terms {set(out.terms)} vs {set(ref_out.terms)}"
    for k in ref_out.terms:
        assert_close_rel(out.terms[k].detach(), ref_out.terms[k].detach(), TOL_OUT, f"{tag}term {k}", seed)
    assert set(out.metrics) == set(ref_out.metrics)
    for name, g, rg in zip(["grad_hidden", "grad_weight", "grad_bias"], grads, ref_grads):
        if rg is None:
            assert g is None
            continue
        assert g is not None, f"{tag}{name} missing"
        assert_close_rel(g, rg, TOL_GRAD, f"{tag}{name}", seed)


# ----------------------------------------------------------------------------- every loss, torch backend
@pytest.mark.parametrize("loss_type", ALL_LOSSES)
def test_every_loss_vs_reference_padded(loss_type):
    seed = new_seed()
    print(f"seed={seed}")
    batch = make_pref_batch(3, 13, 24, 157, bias=True, seed=seed, device=DEVICE)
    loss_kw = loss_kwargs_for(loss_type, 3, seed)
    refs = reference_refs(batch) if needs_reference(loss_type) else None
    ref_out, ref_grads = reference_loss(batch, loss_kw, refs)
    out, grads = fused(batch, loss_kw, "torch", refs=refs)
    compare(out, grads, ref_out, ref_grads, seed, loss_type)


@pytest.mark.parametrize("loss_type", ALL_LOSSES)
def test_every_loss_vs_reference_packed(loss_type):
    seed = new_seed()
    batch = make_pref_batch(2, 11, 16, 89, seed=seed, device=DEVICE)
    loss_kw = loss_kwargs_for(loss_type, 2, seed)
    refs = reference_refs(batch) if needs_reference(loss_type) else None
    ref_out, ref_grads = reference_loss(batch, loss_kw, refs)
    out, grads = fused(batch, loss_kw, "torch", refs=refs, packed=True)
    compare(out, grads, ref_out, ref_grads, seed, loss_type)


@pytest.mark.parametrize("loss_type", [n for n in ALL_LOSSES if not upo.loss_spec(n).needs_reference])
def test_reference_free_losses_without_refs_match_with_refs(loss_type):
    """Reference-free losses do not depend on ref log-probs at all."""
    seed = new_seed()
    batch = make_pref_batch(2, 9, 16, 61, seed=seed, device=DEVICE)
    loss_kw = loss_kwargs_for(loss_type, 2, seed)
    a, ga = fused(batch, loss_kw, "torch")
    b, gb = fused(batch, loss_kw, "torch", refs=reference_refs(batch))
    assert rel_err(a.losses.detach(), b.losses.detach()) < 1e-6
    assert rel_err(ga[0], gb[0]) < 1e-6


COMBOS = [
    (["sigmoid", "upo"], [1.0, 0.5]),
    (["sigmoid", "nll"], [1.0, 0.2]),
    (["ipo", "nll", "upo"], [0.7, 0.3, 2.0]),
    (["simpo", "nll"], None),
]


@pytest.mark.parametrize("combo", COMBOS, ids=["+".join(c[0]) for c in COMBOS])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_loss_combinations(combo, packed):
    seed = new_seed()
    names, weights = combo
    batch = make_pref_batch(3, 10, 20, 131, bias=True, seed=seed, device=DEVICE)
    loss_kw = loss_kwargs_for(names, 3, seed)
    if weights is not None:
        loss_kw["loss_weights"] = weights
    refs = reference_refs(batch) if needs_reference(names) else None
    ref_out, ref_grads = reference_loss(batch, loss_kw, refs)
    out, grads = fused(batch, loss_kw, "torch", refs=refs, packed=packed)
    if packed:
        compare(out, grads, ref_out, ref_grads, seed, "+".join(names))
    # the weighted sum of the per-term batch means is the loss
    w = weights or [1.0] * len(names)
    total = sum(wi * out.terms[n] for wi, n in zip(w, names))
    assert abs(total.item() - out.loss.item()) <= 1e-5 * max(1.0, abs(out.loss.item()))


@pytest.mark.parametrize("logit_kw", [dict(logit_scale=0.7, softcap=5.0), dict(softcap=3.0), dict(logit_scale=1.5)],
                         ids=["scale+cap", "cap", "scale"])
def test_logit_scale_softcap_through_fused(logit_kw):
    seed = new_seed()
    batch = make_pref_batch(2, 12, 24, 101, bias=True, seed=seed, device=DEVICE)
    loss_kw = loss_kwargs_for(["sigmoid", "upo"], 2, seed)
    refs = reference_refs(batch, **logit_kw)
    ref_out, ref_grads = reference_loss(batch, loss_kw, refs, **logit_kw)
    out, grads = fused(batch, loss_kw, "torch", refs=refs, **logit_kw)
    compare(out, grads, ref_out, ref_grads, seed)
    # and the ref_hidden path applies the same logit transform to the reference model
    out2, grads2 = fused(batch, loss_kw, "torch", use_ref_hidden=True, **logit_kw)
    assert_close_rel(out2.losses.detach(), ref_out.losses.detach(), TOL_OUT, "losses (ref_hidden)", seed)
    assert_close_rel(grads2[0], ref_grads[0], TOL_GRAD, "grad_hidden (ref_hidden)", seed)


# ----------------------------------------------------------------------------- reference paths
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "kto", "ipo"])
def test_ref_hidden_same_as_precomputed_refs(loss_type, packed):
    seed = new_seed()
    batch = make_pref_batch(3, 12, 16, 97, bias=True, seed=seed, device=DEVICE)
    loss_kw = loss_kwargs_for(loss_type, 3, seed)
    refs = reference_refs(batch)
    pre, gpre = fused(batch, loss_kw, "torch", refs=refs, packed=packed)
    onf, gonf = fused(batch, loss_kw, "torch", use_ref_hidden=True, packed=packed)
    # fp32 kernel refs vs float64 refs: both within the contract of each other
    assert_close_rel(onf.loss.detach(), pre.loss.detach(), TOL_OUT, "loss", seed)
    assert_close_rel(onf.losses.detach(), pre.losses.detach(), TOL_OUT, "losses", seed)
    for a, b, name in zip(gonf, gpre, ["grad_hidden", "grad_weight", "grad_bias"]):
        assert_close_rel(a, b, TOL_GRAD, name, seed)


def test_ref_bias_defaults_to_bias_when_ref_weight_defaults():
    """ref_hidden without ref_weight/ref_bias means "same LM head": the policy's weight AND bias.

    (Defaulting ref_weight to weight but dropping the bias would score the reference model with half of
    the policy head.)
    """
    seed = new_seed()
    batch = make_pref_batch(2, 8, 16, 61, bias=True, seed=seed, device=DEVICE)
    loss_kw = loss_kwargs_for("sigmoid", 2, seed)
    ref_out, _ = reference_loss(batch, loss_kw, reference_refs(batch))
    out, _ = fused(batch, loss_kw, "torch", use_ref_hidden=True, explicit_ref_bias=False)
    assert_close_rel(out.losses.detach(), ref_out.losses.detach(), TOL_OUT, "losses (ref_bias defaulted)", seed)


def test_ref_weight_and_ref_bias_and_no_grad_into_reference():
    """A separate reference head (ref_weight, ref_bias) is used, and nothing reference gets a grad."""
    seed = new_seed()
    batch = make_pref_batch(2, 10, 16, 73, bias=True, seed=seed, device=DEVICE)
    g = gen(seed + 3)
    ref_w = (batch.weight + 0.2 * torch.randn(batch.weight.shape, generator=g).to(DEVICE)).requires_grad_(True)
    ref_b = (batch.bias + 0.2 * torch.randn(batch.bias.shape, generator=g).to(DEVICE)).requires_grad_(True)
    ref_h = batch.ref_hidden.clone().requires_grad_(True)
    with torch.no_grad():
        r, _ = reference.reference_sequence_logprobs(ref_h, ref_w, batch.labels, ref_b)
    refs = (r[:2], r[2:])
    loss_kw = loss_kwargs_for("sigmoid", 2, seed)
    ref_out, ref_grads = reference_loss(batch, loss_kw, refs)
    h, w, bb = leaf(batch.hidden), leaf(batch.weight), leaf(batch.bias)
    with poison_outputs():
        out = upo.fused_loss(h, w, batch.labels, bias=bb, ref_hidden=ref_h, ref_weight=ref_w, ref_bias=ref_b,
                             backend="torch", **loss_kw)
        out.loss.backward()
    compare(out, [h.grad, w.grad, bb.grad], ref_out, ref_grads, seed)
    assert ref_h.grad is None and ref_w.grad is None and ref_b.grad is None


# ----------------------------------------------------------------------------- packed vs padded, per pair
@pytest.mark.parametrize("loss_type", ["sigmoid", "upo", "simpo"])
def test_packed_equals_padded(loss_type):
    seed = new_seed()
    batch = make_pref_batch(3, 14, 24, 113, bias=True, seed=seed, device=DEVICE)
    loss_kw = loss_kwargs_for(loss_type, 3, seed)
    refs = reference_refs(batch) if needs_reference(loss_type) else None
    pad, gpad = fused(batch, loss_kw, "torch", refs=refs)
    pk, gpk = fused(batch, loss_kw, "torch", refs=refs, packed=True)
    assert rel_err(pk.losses.detach(), pad.losses.detach()) < 1e-6, f"seed={seed}"
    assert rel_err(pk.loss.detach(), pad.loss.detach()) < 1e-6, f"seed={seed}"
    assert rel_err(gpk[0], gpad[0]) < 1e-6, f"seed={seed}"
    assert rel_err(gpk[1], gpad[1]) < 1e-6 and rel_err(gpk[2], gpad[2]) < 1e-6, f"seed={seed}"
    # padding / prompt positions get exactly zero gradient
    ignored = batch.labels == -100
    assert (gpad[0][ignored] == 0).all()


def test_per_pair_losses_are_independent():
    """losses[i] depends only on pair i: permuting pairs permutes the per-pair losses (sigmoid)."""
    seed = new_seed()
    batch = make_pref_batch(4, 9, 16, 67, seed=seed, device=DEVICE)
    loss_kw = loss_kwargs_for("sigmoid", 4, seed)
    refs = reference_refs(batch)
    out, _ = fused(batch, loss_kw, "torch", refs=refs)
    perm = torch.tensor([2, 0, 3, 1])
    rows = torch.cat([perm, perm + 4])
    pb = type(batch)(batch.hidden[rows], batch.labels[rows], batch.weight, batch.bias, batch.ref_hidden[rows],
                     [batch.lengths[i] for i in rows.tolist()], seed)
    out_p, _ = fused(pb, loss_kw, "torch", refs=(refs[0][perm], refs[1][perm]))
    assert rel_err(out_p.losses.detach(), out.losses.detach()[perm]) < 1e-6
    assert out.losses.shape == (4,)


# ----------------------------------------------------------------------------- sequence_logprobs
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_sequence_logprobs_vs_reference(backend, packed):
    seed = new_seed()
    batch = make_pref_batch(2, 9, 16, 71, bias=True, seed=seed, device=DEVICE)
    if packed:
        hid, lab, cu = pack(batch.hidden, batch.labels, batch.lengths)
        ref_s, ref_n = reference.reference_sequence_logprobs_packed(hid, batch.weight, lab, cu, batch.bias,
                                                                    softcap=4.0)
    else:
        hid, lab, cu = batch.hidden, batch.labels, None
        ref_s, ref_n = reference.reference_sequence_logprobs(hid, batch.weight, lab, batch.bias, softcap=4.0)
    with poison_outputs():
        s, n = sequence_logprobs(hid, batch.weight, lab, cu_seqlens=cu, bias=batch.bias, softcap=4.0,
                                 backend=backend)
    assert s.dtype == torch.float32 and s.shape == (4,)
    assert n.dtype == torch.int64 and torch.equal(n.cpu(), ref_n.cpu())
    assert_close_rel(s, ref_s, TOL_OUT, "sequence sums", seed)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("prompt", [0, 5], ids=["all_response", "with_prompts"])
def test_sequence_logprobs_grads_with_and_without_prompts(backend, prompt):
    """Every token a response token (hidden goes to the kernel uncopied) or prompts first (only
    response rows are gathered; their gradient is scattered back, prompts get exactly 0)."""
    seed = new_seed()
    g = gen(seed)
    hidden = torch.randn(4, 13, 24, generator=g)
    weight = torch.randn(97, 24, generator=g) * 0.5
    labels = torch.randint(0, 97, (4, 13), generator=g)
    labels[:, :prompt] = -100
    up = torch.randn(4, generator=g).double()
    h64, w64 = leaf(hidden, torch.float64), leaf(weight, torch.float64)
    ref_s, _ = reference.reference_sequence_logprobs(h64, w64, labels)
    (ref_s * up).sum().backward()
    h, w = leaf(hidden.to(DEVICE)), leaf(weight.to(DEVICE))
    with poison_outputs():
        s, _ = sequence_logprobs(h, w, labels.to(DEVICE), backend=backend)
        (s * up.float().to(DEVICE)).sum().backward()
    assert_close_rel(s, ref_s, TOL_OUT, "sequence sums", seed)
    assert_close_rel(h.grad, h64.grad, TOL_GRAD, "grad_hidden", seed)
    assert_close_rel(w.grad, w64.grad, TOL_GRAD, "grad_weight", seed)
    assert (h.grad[:, :prompt] == 0).all(), "prompt positions must get exactly zero gradient"


# ----------------------------------------------------------------------------- triton backend (interpreter)
TRITON_CASES = [("sigmoid", False), (["sigmoid", "upo"], True), ("simpo", False), (["sigmoid", "nll"], True),
                ("kto", False)]


@pytest.mark.parametrize("case", TRITON_CASES, ids=[
    f"{'+'.join([c[0]] if isinstance(c[0], str) else c[0])}-{'packed' if c[1] else 'padded'}" for c in TRITON_CASES])
def test_triton_backend_vs_reference(case):
    loss_type, packed = case
    seed = new_seed()
    batch = make_pref_batch(2, 7, 16, 67, bias=True, seed=seed, device=DEVICE)
    loss_kw = loss_kwargs_for(loss_type, 2, seed)
    if isinstance(loss_type, list):
        loss_kw["loss_weights"] = [1.0, 0.3]
    refs = reference_refs(batch) if needs_reference(loss_type) else None
    ref_out, ref_grads = reference_loss(batch, loss_kw, refs)
    out, grads = fused(batch, loss_kw, "triton", refs=refs, packed=packed)
    if packed:
        compare(out, grads, ref_out, ref_grads, seed, "triton")


def test_triton_ref_hidden_path():
    seed = new_seed()
    batch = make_pref_batch(2, 6, 16, 53, seed=seed, device=DEVICE)
    loss_kw = loss_kwargs_for("sigmoid", 2, seed)
    refs = reference_refs(batch)
    ref_out, ref_grads = reference_loss(batch, loss_kw, refs)
    out, grads = fused(batch, loss_kw, "triton", use_ref_hidden=True)
    compare(out, grads, ref_out, ref_grads, seed, "triton ref_hidden")
