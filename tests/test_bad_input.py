"""Bad inputs fail early with a clear error that names the offending argument (or batch row).

Errors must be ``ValueError`` (``TypeError`` accepted for dtype problems); the message must contain the
argument's name. Never a NaN result, a crash deep inside a kernel, or a silently wrong answer.
"""
from __future__ import annotations

import re

import pytest
import torch

import upo
from helpers import make_inputs, make_pref_batch, new_seed, pack, rel_err
from upo.fused import sequence_logprobs
from upo_kernels import linear_logprobs, logprobs_from_logits, reference

BACKENDS = ["torch", "triton"]
DTYPE_ERRORS = (ValueError, TypeError)


def raises_naming(exc, *names, fn):
    """Call ``fn``; it must raise ``exc`` whose message contains at least one of ``names``."""
    with pytest.raises(exc) as info:
        fn()
    msg = str(info.value)
    assert any(n in msg for n in names), f"error message should name one of {names}: {msg!r}"
    return msg


def pref(b=2, t=8, d=8, v=31, **kw):
    return make_pref_batch(b, t, d, v, seed=new_seed(), **kw)


# ----------------------------------------------------------------------------- labels out of range
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", ["eq_vocab", "above_vocab", "minus_5", "minus_101"])
def test_linear_labels_out_of_range(backend, bad):
    inp = make_inputs(9, 8, 31)
    value = {"eq_vocab": 31, "above_vocab": 1000, "minus_5": -5, "minus_101": -101}[bad]
    inp.labels[4] = value
    raises_naming(ValueError, "labels", fn=lambda: linear_logprobs(inp.hidden, inp.weight, inp.labels,
                                                                   backend=backend))


@pytest.mark.parametrize("value", [31, -7])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_fused_labels_out_of_range(value, packed):
    b = pref()
    b.labels[3, b.labels[3].ne(-100).nonzero()[0, 0]] = value
    hid, lab, cu = pack(b.hidden, b.labels, b.lengths) if packed else (b.hidden, b.labels, None)
    raises_naming(ValueError, "labels", fn=lambda: upo.fused_loss(hid, b.weight, lab, cu_seqlens=cu,
                                                                  loss_type="simpo", backend="torch"))


def test_ignore_index_respected_in_validation():
    """With ignore_index=-1, a -100 label is out of range (not silently ignored)."""
    inp = make_inputs(6, 4, 11, ignore_frac=0.0)
    inp.labels[2] = -100
    raises_naming(ValueError, "labels", fn=lambda: linear_logprobs(inp.hidden, inp.weight, inp.labels,
                                                                   ignore_index=-1, backend="torch"))


def test_logprobs_from_logits_labels_out_of_range():
    logits = torch.randn(5, 7)
    labels = torch.tensor([0, 6, 7, -100, 1])
    raises_naming(ValueError, "labels", fn=lambda: logprobs_from_logits(logits, labels, backend="torch"))
    raises_naming(ValueError, "labels", fn=lambda: logprobs_from_logits(logits, labels[:4], backend="torch"))


# ----------------------------------------------------------------------------- empty responses
@pytest.mark.parametrize("row", [0, 3, 5])
def test_response_without_tokens_names_row(row):
    b = pref(b=3)
    b.labels[row] = -100
    msg = raises_naming(ValueError, "row", fn=lambda: upo.fused_loss(b.hidden, b.weight, b.labels, loss_type="simpo",
                                                                     backend="torch"))
    assert re.search(rf"\b{row}\b", msg), f"message should name row {row}: {msg!r}"


@pytest.mark.parametrize("row", [1, 2])
def test_packed_response_without_tokens_names_row(row):
    b = pref(b=2)
    hid, lab, cu = pack(b.hidden, b.labels, b.lengths)
    lab[int(cu[row]):int(cu[row + 1])] = -100
    msg = raises_naming(ValueError, "row", "sequence", fn=lambda: upo.fused_loss(
        hid, b.weight, lab, cu_seqlens=cu, loss_type="simpo", backend="torch"))
    assert re.search(rf"\b{row}\b", msg), f"message should name sequence {row}: {msg!r}"


def test_packed_zero_length_sequence_is_an_error():
    b = pref(b=2)
    hid, lab, cu = pack(b.hidden, b.labels, b.lengths)
    cu = cu.clone()
    cu[2] = cu[1]  # [0, c1, c1, c3, N]: sequence 1 is empty, sequence 2 absorbs the old sequences 1-2
    assert cu.numel() == 5
    msg = raises_naming(ValueError, "row", "sequence", "cu_seqlens", fn=lambda: upo.fused_loss(
        hid, b.weight, lab, cu_seqlens=cu, loss_type="simpo", backend="torch"))
    assert "cu_seqlens" in msg or re.search(r"\b1\b", msg), msg


# ----------------------------------------------------------------------------- dtypes and devices
@pytest.mark.parametrize("wdtype", [torch.float64, torch.bfloat16])
def test_dtype_mismatch_hidden_weight(wdtype):
    inp = make_inputs(5, 8, 13)
    w = inp.weight.to(wdtype)
    raises_naming(DTYPE_ERRORS, "weight", "hidden", fn=lambda: linear_logprobs(inp.hidden, w, inp.labels,
                                                                               backend="torch"))
    b = pref()
    raises_naming(DTYPE_ERRORS, "weight", "hidden", fn=lambda: upo.fused_loss(
        b.hidden, b.weight.to(wdtype), b.labels, loss_type="simpo", backend="torch"))


def test_bias_dtype_and_shape():
    inp = make_inputs(5, 8, 13)
    raises_naming(DTYPE_ERRORS, "bias", fn=lambda: linear_logprobs(inp.hidden, inp.weight, inp.labels,
                                                                   bias=torch.zeros(13, dtype=torch.float64)))
    raises_naming(ValueError, "bias", fn=lambda: linear_logprobs(inp.hidden, inp.weight, inp.labels,
                                                                 bias=torch.zeros(12)))


def test_integer_hidden_and_float_labels():
    inp = make_inputs(5, 8, 13)
    raises_naming(DTYPE_ERRORS, "hidden", fn=lambda: linear_logprobs(inp.hidden.long(), inp.weight.long(),
                                                                     inp.labels))
    raises_naming(DTYPE_ERRORS, "labels", fn=lambda: linear_logprobs(inp.hidden, inp.weight, inp.labels.float()))
    b = pref()
    raises_naming(DTYPE_ERRORS, "labels", fn=lambda: upo.fused_loss(b.hidden, b.weight, b.labels.float(),
                                                                    loss_type="simpo"))


def test_device_mismatch_meta():
    """A tensor on another device (meta stands in for cuda on a CPU box) is refused up front."""
    inp = make_inputs(5, 8, 13)
    raises_naming(ValueError, "weight", "hidden", fn=lambda: linear_logprobs(inp.hidden, inp.weight.to("meta"),
                                                                             inp.labels))
    raises_naming(ValueError, "labels", "hidden", fn=lambda: linear_logprobs(inp.hidden.to("meta"),
                                                                             inp.weight.to("meta"), inp.labels))
    b = pref()
    raises_naming(ValueError, "weight", "hidden", fn=lambda: upo.fused_loss(b.hidden, b.weight.to("meta"), b.labels,
                                                                            loss_type="simpo"))
    raises_naming(ValueError, "hidden", "labels", "weight", fn=lambda: upo.fused_loss(
        b.hidden.to("meta"), b.weight, b.labels, loss_type="simpo"))


# ----------------------------------------------------------------------------- batch layout
def test_odd_number_of_rows_padded():
    b = pref(b=2)
    raises_naming(ValueError, "hidden", fn=lambda: upo.fused_loss(b.hidden[:3], b.weight, b.labels[:3],
                                                                  loss_type="simpo", backend="torch"))


@pytest.mark.parametrize("which", ["padded_labels_longer", "padded_labels_rows", "hidden_2d_no_cu",
                                   "packed_labels_short", "hidden_dim_vs_weight"])
def test_shape_mismatches(which):
    b = pref(b=2, t=8, d=8)
    hid, lab, cu = b.hidden, b.labels, None
    names = ("labels",)
    if which == "padded_labels_longer":
        lab = torch.cat([lab, torch.full((4, 1), -100)], 1)
    elif which == "padded_labels_rows":
        lab = lab[:2]
    elif which == "hidden_2d_no_cu":
        hid = hid.reshape(-1, 8)
        names = ("hidden", "cu_seqlens")
    elif which == "packed_labels_short":
        hid, lab, cu = pack(b.hidden, b.labels, b.lengths)
        lab = lab[:-1]
    else:
        hid = hid[..., :7]
        names = ("hidden", "weight")
    raises_naming(ValueError, *names, fn=lambda: upo.fused_loss(hid, b.weight, lab, cu_seqlens=cu,
                                                                loss_type="simpo", backend="torch"))


def test_linear_shape_mismatches():
    inp = make_inputs(6, 8, 13)
    raises_naming(ValueError, "labels", "hidden", fn=lambda: linear_logprobs(inp.hidden, inp.weight,
                                                                             inp.labels[:5]))
    raises_naming(ValueError, "hidden", "weight", fn=lambda: linear_logprobs(inp.hidden[:, :7], inp.weight,
                                                                             inp.labels))
    raises_naming(ValueError, "weight", fn=lambda: linear_logprobs(inp.hidden, inp.weight[None], inp.labels))


# ----------------------------------------------------------------------------- cu_seqlens
@pytest.mark.parametrize("which", ["not_from_0", "decreasing", "last_short", "last_long", "odd_sequences",
                                   "float_dtype", "two_dim"])
def test_bad_cu_seqlens(which):
    b = pref(b=2)
    hid, lab, cu = pack(b.hidden, b.labels, b.lengths)
    n = hid.shape[0]
    exc = ValueError
    if which == "not_from_0":
        cu = cu.clone()
        cu[0] = 1
    elif which == "decreasing":
        cu = cu.clone()
        cu[1], cu[2] = cu[2].clone(), cu[1].clone()
    elif which == "last_short":
        cu = cu.clone()
        cu[-1] = n - 1
    elif which == "last_long":
        cu = cu.clone()
        cu[-1] = n + 1
    elif which == "odd_sequences":
        cu = torch.cat([cu[:2], cu[3:]])  # 3 sequences
    elif which == "float_dtype":
        cu = cu.float()
        exc = DTYPE_ERRORS
    else:
        cu = cu[None]
    raises_naming(exc, "cu_seqlens", fn=lambda: upo.fused_loss(hid, b.weight, lab, cu_seqlens=cu, loss_type="simpo",
                                                               backend="torch"))


# ----------------------------------------------------------------------------- reference arguments
def test_ref_hidden_shape_mismatch_names_ref_hidden():
    b = pref(b=2, t=8)
    raises_naming(ValueError, "ref_hidden", fn=lambda: upo.fused_loss(
        b.hidden, b.weight, b.labels, ref_hidden=b.ref_hidden[:, :7], loss_type="sigmoid", backend="torch"))


def test_ref_hidden_and_precomputed_refs_together():
    b = pref(b=2)
    raises_naming(ValueError, "ref_hidden", "ref_chosen_logps", fn=lambda: upo.fused_loss(
        b.hidden, b.weight, b.labels, ref_hidden=b.ref_hidden, ref_chosen_logps=torch.zeros(2),
        ref_rejected_logps=torch.zeros(2), loss_type="sigmoid", backend="torch"))


def test_missing_refs_for_reference_loss():
    b = pref(b=2)
    raises_naming(ValueError, "ref_chosen_logps", "ref", fn=lambda: upo.fused_loss(
        b.hidden, b.weight, b.labels, loss_type="sigmoid", backend="torch"))
    raises_naming(ValueError, "ref_rejected_logps", fn=lambda: upo.fused_loss(
        b.hidden, b.weight, b.labels, ref_chosen_logps=torch.zeros(2), loss_type="sigmoid", backend="torch"))


def test_wrong_ref_logps_shape():
    b = pref(b=2)
    raises_naming(ValueError, "ref_chosen_logps", fn=lambda: upo.fused_loss(
        b.hidden, b.weight, b.labels, ref_chosen_logps=torch.zeros(3), ref_rejected_logps=torch.zeros(2),
        loss_type="sigmoid", backend="torch"))


def test_lengths_are_not_user_arguments():
    b = pref(b=2)
    raises_naming(ValueError, "chosen_lengths", fn=lambda: upo.fused_loss(
        b.hidden, b.weight, b.labels, chosen_lengths=torch.ones(2), loss_type="simpo", backend="torch"))


# ----------------------------------------------------------------------------- scalars, backend
def test_bad_backend_name():
    inp = make_inputs(4, 8, 16)
    raises_naming(ValueError, "backend", fn=lambda: linear_logprobs(inp.hidden, inp.weight, inp.labels,
                                                                    backend="Torch"))
    raises_naming(ValueError, "backend", fn=lambda: logprobs_from_logits(torch.randn(4, 16), inp.labels,
                                                                         backend="xla"))
    b = pref()
    raises_naming(ValueError, "backend", fn=lambda: upo.fused_loss(b.hidden, b.weight, b.labels, loss_type="simpo",
                                                                   backend="fast"))


@pytest.mark.parametrize("kw,name", [(dict(logit_scale=0.0), "logit_scale"), (dict(logit_scale=float("nan")),
                                                                              "logit_scale"),
                                     (dict(softcap=0.0), "softcap"), (dict(softcap=-3.0), "softcap"),
                                     (dict(softcap=float("inf")), "softcap")])
def test_bad_scalars(kw, name):
    inp = make_inputs(4, 8, 16)
    raises_naming(ValueError, name, fn=lambda: linear_logprobs(inp.hidden, inp.weight, inp.labels, backend="torch",
                                                               **kw))


# ----------------------------------------------------------------------------- NaN / inf
@pytest.mark.parametrize("what", ["nan", "inf"])
def test_nonfinite_hidden_fused_is_clear_error(what):
    b = pref(b=2)
    r, c = 2, int(b.labels[2].ne(-100).nonzero()[0, 0])  # a response token
    b.hidden[r, c, 3] = float(what)
    raises_naming(ValueError, "hidden", fn=lambda: upo.fused_loss(b.hidden, b.weight, b.labels, loss_type="simpo",
                                                                  backend="torch"))


def test_nonfinite_weight_fused_is_clear_error():
    b = pref(b=2)
    w = b.weight.clone()
    w[5, 1] = float("nan")
    raises_naming(ValueError, "weight", fn=lambda: upo.fused_loss(b.hidden, w, b.labels, loss_type="simpo",
                                                                  backend="torch"))


def test_nonfinite_hidden_at_ignored_positions_is_harmless():
    """Garbage (NaN) in prompt/padding hidden states must not leak into the loss or the gradients."""
    b = pref(b=2, t=10)
    clean = upo.fused_loss(b.hidden.clone().requires_grad_(True), b.weight, b.labels, loss_type="simpo",
                           backend="torch")
    h = b.hidden.clone()
    h[b.labels == -100] = float("nan")
    h.requires_grad_(True)
    w = b.weight.clone().requires_grad_(True)
    out = upo.fused_loss(h, w, b.labels, loss_type="simpo", backend="torch")
    assert torch.isfinite(out.loss) and abs(out.loss.item() - clean.loss.item()) < 1e-6
    out.loss.backward()
    assert torch.isfinite(w.grad).all() and torch.isfinite(h.grad).all()
    assert (h.grad[b.labels == -100] == 0).all()


@pytest.mark.parametrize("where", ["ref_hidden", "ref_weight", "ref_bias"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_nonfinite_reference_input_fused_is_named_as_given(where, packed):
    """Issue 34: a NaN or inf in the reference pass names ref_hidden / ref_weight / ref_bias, not the policy's
    hidden or weight (which are finite)."""
    b = pref(b=2)
    hid, lab, cu = pack(b.hidden, b.labels, b.lengths) if packed else (b.hidden, b.labels, None)
    ref_hid = (pack(b.ref_hidden, b.labels, b.lengths)[0] if packed else b.ref_hidden).clone()
    ref_weight, ref_bias = b.weight.clone(), torch.zeros(b.weight.shape[0])
    response = (lab != -100).nonzero()[0].tolist()  # a token whose log-prob is read
    {"ref_hidden": lambda: ref_hid.__setitem__((*response, 1), float("nan")),
     "ref_weight": lambda: ref_weight.__setitem__((0, 0), float("nan")),
     "ref_bias": lambda: ref_bias.__setitem__(3, float("inf"))}[where]()
    msg = raises_naming(ValueError, where, fn=lambda: upo.fused_loss(
        hid, b.weight, lab, cu_seqlens=cu, ref_hidden=ref_hid, ref_weight=ref_weight, ref_bias=ref_bias,
        bias=torch.zeros(b.weight.shape[0]), loss_type="sigmoid", backend="torch"))
    assert "NaN or inf" in msg and not re.search(r"(?<!ref_)(hidden|weight|bias) contain", msg), msg


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["hidden", "weight", "bias"])
@pytest.mark.parametrize("what", ["nan", "inf"])
def test_linear_logprobs_names_a_nonfinite_input(backend, where, what):
    """Issue 34: NaN or inf in hidden (a labelled row), weight or bias is a ValueError naming it (docs/kernels.md,
    as fused_loss), never a NaN log-prob; with stats too."""
    seed = new_seed()
    inp = make_inputs(12, 8, 37, ignore_frac=0.0, seed=seed)
    hidden, weight, bias = inp.hidden.clone(), inp.weight.clone(), torch.zeros(37)
    hidden[:, 1] = hidden[:, 1].abs() + 0.1  # an inf weight in column 1 then gives +inf logits, not -inf ones
    position = {"hidden": (hidden, (4, 5)), "weight": (weight, (3, 1)), "bias": (bias, (13,))}
    tensor, index = position[where]
    tensor[index] = float(what)
    for stats in ((), ("entropy",)):
        msg = raises_naming(ValueError, where, fn=lambda: linear_logprobs(hidden, weight, inp.labels, bias=bias,
                                                                          backend=backend, stats=stats))
        assert "NaN or inf" in msg and all(name not in msg for name in {"hidden", "weight", "bias"} - {where}), msg


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_logprobs_nan_at_ignored_rows_is_harmless(backend):
    """The check reads the log-probs: a NaN no log-prob reads (an ignored row) is no error and changes nothing."""
    inp = make_inputs(12, 8, 37, ignore_frac=0.3, seed=new_seed())
    hidden = inp.hidden.clone()
    hidden[inp.labels == -100] = float("nan")
    out = linear_logprobs(hidden, inp.weight, inp.labels, backend=backend)
    assert torch.equal(out, linear_logprobs(inp.hidden, inp.weight, inp.labels, backend=backend))


def test_linear_logprobs_overflowing_logits_are_not_blamed_on_an_input():
    """Finite inputs whose logits overflow float32: the error says so instead of naming a finite input."""
    inp = make_inputs(6, 8, 13, ignore_frac=0.0, seed=new_seed())
    msg = raises_naming(ValueError, "overflow", fn=lambda: linear_logprobs(inp.hidden * 1e30, inp.weight * 1e30,
                                                                           inp.labels, backend="torch"))
    assert "contains" not in msg, msg


def test_sequence_logprobs_names_row_for_empty_sequence():
    b = pref(b=2)
    b.labels[1] = -100
    msg = raises_naming(ValueError, "row", fn=lambda: sequence_logprobs(b.hidden, b.weight, b.labels,
                                                                        backend="torch"))
    assert re.search(r"\b1\b", msg), msg
