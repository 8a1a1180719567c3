"""The first-use check of the Triton kernels (upo_kernels/first_use_check.py), forced on CPU under the interpreter
(fp32): correct kernels pass it and keep the Triton backend; a planted wrong forward, backward or statistic, or a
kernel that raises, gives one warning naming the kernel, the device and the Triton version, and the torch
backend's numbers for the rest of the process, for that configuration only; ``UPO_KERNEL_CHECK=0`` skips it.
Its 16-bit rule, which the interpreter cannot reach (no bf16 ``tl.dot``), runs with the torch backend standing
in for the kernels."""
from __future__ import annotations

import os
import sys
import warnings

import pytest
import torch

from helpers import leaf, make_inputs, new_seed
from upo_kernels import chunked, first_use_check, linear_logprobs, triton_ops
from upo_kernels.first_use_check import KernelCheckWarning

STATS = ("entropy", "is_top1")


@pytest.fixture(autouse=True)
def checked_on_cpu(monkeypatch):
    """The check forced on CPU, with no verdict from an earlier test."""
    monkeypatch.setattr(first_use_check, "CHECK_ON_CPU", True)
    monkeypatch.setattr(first_use_check, "_verdicts", {})
    monkeypatch.delenv("UPO_KERNEL_CHECK", raising=False)


def head_inputs(seed=None):
    """Fresh random head inputs of odd sizes, with a bias and ignored rows."""
    return make_inputs(37, 40, 301, bias=True, ignore_frac=0.25, seed=new_seed() if seed is None else seed)


def call(inp, backend="triton", stats=(), **kernel_options):
    """Log-probs (and statistics) and every gradient of one ``linear_logprobs`` call."""
    h, w, b = leaf(inp.hidden), leaf(inp.weight), leaf(inp.bias)
    out = linear_logprobs(h, w, inp.labels, bias=b, backend=backend, stats=stats, logit_scale=0.7, softcap=6.0,
                          **kernel_options)
    logp = out.logp if stats else out
    upstream = torch.linspace(-1, 1, logp.numel()).reshape(logp.shape)
    (logp * upstream).sum().backward()
    values = [logp.detach(), *(out.stats.values() if stats else ())]
    return values, [h.grad, w.grad, b.grad]


def same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a[0] + a[1], b[0] + b[1]))


def kernel_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, KernelCheckWarning)]


def counted(monkeypatch, module, name):
    """Count the calls of ``module.name``."""
    calls, original = [], getattr(module, name)

    def wrapper(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def plant(monkeypatch, name, change):
    """Replace ``triton_ops.name`` by ``change(result)`` of the real kernels' result; count its calls."""
    calls, original = [], getattr(triton_ops, name)

    def planted(*args, **kwargs):
        calls.append(1)
        return change(original(*args, **kwargs))

    monkeypatch.setattr(triton_ops, name, planted)
    return calls


def wrong_grad_weight(grads):
    grad_h, grad_w, grad_b = grads
    return grad_h, grad_w * 1.001, grad_b  # 1e-3 relative: ten times the GPU tests' gradient tolerance


def wrong_log_prob(result):
    logp, lse, *values = result
    return (logp + 1e-3 * (logp != 0), lse, *values)  # 1e-3 nats on every labelled token


def wrong_entropy(result):
    logp, lse, values = result
    return logp, lse, dict(values, entropy=values["entropy"] + 1e-3)


def test_correct_kernels_pass_once_and_keep_the_triton_backend(monkeypatch):
    checks = counted(monkeypatch, first_use_check, "_first_use_problem")
    inp = head_inputs()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        checked = call(inp, stats=STATS)
        again = call(inp, stats=STATS)
    assert not kernel_warnings(record) and len(checks) == 1
    assert list(first_use_check._verdicts.values()) == [True]
    monkeypatch.setenv("UPO_KERNEL_CHECK", "0")
    assert same(checked, again) and same(checked, call(inp, stats=STATS))  # the Triton kernels' own numbers


@pytest.mark.parametrize("fwd_impl", ["fused", "cublas"])
@pytest.mark.parametrize("fault", ["backward", "forward", "statistic", "raises"])
def test_a_wrong_kernel_is_caught_once_and_the_torch_backend_serves(monkeypatch, fwd_impl, fault):
    monkeypatch.setenv("UPO_FWD_IMPL", fwd_impl)
    if fault == "backward":
        planted = plant(monkeypatch, "backward", wrong_grad_weight)
    elif fault == "forward":
        planted = plant(monkeypatch, "forward", wrong_log_prob)
    elif fault == "statistic":
        planted = plant(monkeypatch, "forward", wrong_entropy)
    else:
        def raises(*args, **kwargs):
            planted.append(1)
            raise RuntimeError("PTX .version 9.9 does not support .target sm_200\nsecond line")

        planted = []
        monkeypatch.setattr(triton_ops, "forward", raises)
    inp = head_inputs()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        first = call(inp, stats=STATS)
        calls_in_check = len(planted)
        second = call(inp, stats=STATS)
    (message,) = kernel_warnings(record)
    kernel = "token-group backward" if fault == "backward" else {"fused": "fused forward (linear_logprobs_fwd_kernel)",
                                                                 "cublas": "cuBLAS forward (logsumexp_tile_kernel)"}[fwd_impl]
    what = {"backward": "grad_weight", "forward": "log-probs", "statistic": "entropy",
            "raises": "failed: RuntimeError: PTX .version 9.9"}[fault]
    for fragment in (kernel, what, "CPU (TRITON_INTERPRET=1)", f"Triton {triton_ops.triton.__version__}",
                     f"UPO_FWD_IMPL={fwd_impl}", "UPO_KERNEL_CHECK=0"):
        assert fragment in message, (fragment, message)
    assert "\n" not in message
    assert calls_in_check >= 1 and len(planted) == calls_in_check  # never called again after the check
    torch_result = call(inp, backend="torch", stats=STATS)
    assert same(first, torch_result) and same(second, torch_result)


def test_the_fallback_is_per_configuration(monkeypatch):
    """A wrong statistic condemns the configuration with statistics; the one without keeps the Triton kernels."""
    plant(monkeypatch, "forward", lambda result: wrong_entropy(result) if len(result) == 3 else result)
    inp = head_inputs()
    with pytest.warns(KernelCheckWarning, match="entropy"):
        call(inp, stats=STATS)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        plain = call(inp)
    assert not kernel_warnings(record)
    assert sorted(first_use_check._verdicts.values()) == [False, True]
    monkeypatch.setenv("UPO_KERNEL_CHECK", "0")
    assert same(plain, call(inp))


def test_the_opt_out_skips_the_check(monkeypatch):
    monkeypatch.setenv("UPO_KERNEL_CHECK", "0")
    plant(monkeypatch, "backward", wrong_grad_weight)
    checks = counted(monkeypatch, first_use_check, "_first_use_problem")
    inp = head_inputs()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        unchecked = call(inp)
    assert not kernel_warnings(record) and not checks and not first_use_check._verdicts
    assert not torch.equal(unchecked[1][1], call(inp, backend="torch")[1][1])  # the planted gradient went through
    monkeypatch.setenv("UPO_KERNEL_CHECK", "yes")
    with pytest.raises(ValueError, match="UPO_KERNEL_CHECK must be 0 or 1, got 'yes'"):
        call(inp)


def test_cpu_is_not_checked_unless_forced(monkeypatch):
    monkeypatch.setattr(first_use_check, "CHECK_ON_CPU", False)
    checks = counted(monkeypatch, first_use_check, "_first_use_problem")
    call(head_inputs())
    assert not checks and not first_use_check._verdicts


def test_a_call_without_labels_leaves_the_check_to_a_later_call(monkeypatch):
    inp = head_inputs()
    inp.labels[:] = -100
    call(inp)
    assert not first_use_check._verdicts
    call(head_inputs())
    assert list(first_use_check._verdicts.values()) == [True]


# -- the 16-bit rule, with the torch backend standing in for the kernels the interpreter cannot run in bf16

class TorchStandIn:
    """The chunked backend under the Triton backend's call signature (``fwd_impl``, ``logits`` dropped);
    ``grad_scale`` plants a wrong weight gradient."""

    def __init__(self, grad_scale=1.0):
        self.grad_scale = grad_scale

    @staticmethod
    def forward(*args, fwd_impl, logits, **kwargs):
        return chunked.linear_logprobs_forward(*args, **kwargs)

    def backward(self, *args, fwd_impl, logits, **kwargs):
        grad_h, grad_w, grad_b = chunked.linear_logprobs_backward(*args, **kwargs)
        return grad_h, grad_w * self.grad_scale, grad_b


@pytest.mark.parametrize("logits", ["fp32", "input"])
def test_16bit_rule_accepts_a_correct_backend_and_catches_a_wrong_gradient(logits):
    inp = make_inputs(70, 48, 2500, dtype=torch.bfloat16, bias=True, ignore_frac=0.2)
    options = {"fwd_impl": "fused", "logits": logits}
    args = (inp.hidden, inp.weight, inp.bias, inp.labels, 0.8, 20.0, -100, STATS)
    assert first_use_check._first_use_problem(TorchStandIn(), options, *args) is None
    problem = first_use_check._first_use_problem(TorchStandIn(grad_scale=1.05), options, *args)
    assert problem is not None and "grad_weight" in problem and "token-group backward" in problem, problem


def test_the_naive_16bit_gradients_are_autograds():
    """The naive path's gradients, written out by hand, against autograd over the same formula in float64."""
    inp = make_inputs(23, 16, 97, bias=True, ignore_frac=0.3)
    upstream = torch.randn(23)
    scale, cap = 0.8, 5.0
    logp, grads = first_use_check._naive_16bit(inp.hidden, inp.weight, inp.bias, inp.labels, upstream, scale, cap,
                                               -100, ())
    h, w, b = leaf(inp.hidden, torch.float64), leaf(inp.weight, torch.float64), leaf(inp.bias, torch.float64)
    keep = inp.labels != -100
    z = cap * torch.tanh(scale * (h @ w.t() + b) / cap)
    want = z.log_softmax(-1).gather(1, torch.where(keep, inp.labels, 0)[:, None])[:, 0]
    (want * keep * upstream).sum().backward()
    torch.testing.assert_close(logp.double(), want[keep].detach(), rtol=1e-5, atol=1e-5)
    for got, expected in zip(grads, (h.grad, w.grad, b.grad)):
        torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5)


def test_cost_benchmark_smoke():
    """``benchmarks/first_use_check_cost.py`` runs (tiny shape): the check passes the torch backend standing in
    for the kernels, and every row has its CPU times and FLOPs."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks/: the checkout's
    from benchmarks import first_use_check_cost

    rows = first_use_check_cost.main(["--smoke"])["rows"]
    assert [row["dtype"] for row in rows] == ["float32", "bfloat16"]
    assert all(row["check_cpu_s"] > 0 and row["call_cpu_s"] > 0 and row["check_flops"] > 0 for row in rows)
