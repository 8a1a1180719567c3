"""pytest-benchmark suite: small CPU cases, fwd+bwd of DPO and UPO, every installed peer.

    pytest benchmarks/bench_cpu_small.py --benchmark-only --benchmark-columns=median,min,rounds
    pytest benchmarks/bench_cpu_small.py --benchmark-only --benchmark-json=bench-results/bench-small.json

Not collected by the test run (``testpaths = tests``). Each benchmark first checks its loss and
gradients against naive PyTorch (fails on disagreement), then records in ``extra_info`` the
peak extra RSS of one call (measured in this shared process, so indicative; the exact numbers
come from ``python -m benchmarks.run_cpu``, one process per case).
"""
from __future__ import annotations

import pytest
import torch

from benchmarks import harness, measure, peers
from benchmarks.inputs import Shape, make_inputs

SHAPES = [Shape(1, 512, 128, 32000, "float32"), Shape(2, 512, 128, 32000, "float32")]
PEERS = ["naive", "ours_torch", "trl_chunked", "trl_selective", "liger_eager", "liger"]
KINDS = ["dpo", "upo"]


@pytest.fixture(scope="module", params=SHAPES, ids=lambda s: s.key)
def case_inputs(request):
    return make_inputs(request.param, "cpu")


@pytest.fixture(scope="module")
def references():
    return {}


def _reference(inputs, kind, cache):
    key = (inputs["shape"].key, kind)
    if key not in cache:
        step, _ = peers.build("naive", inputs, kind)
        cache[key] = harness._finalize(harness._full_step(step, inputs)())
    return cache[key]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("peer", PEERS)
def test_fwd_bwd(benchmark, case_inputs, references, peer, kind):
    ok, why = peers.availability(peer, "cpu")
    if not ok:
        pytest.skip(why)
    if kind not in peers.PEERS[peer][1]:
        pytest.skip(f"{peer} has no {kind} loss")
    step, _ = peers.build(peer, case_inputs, kind)
    run = harness._full_step(step, case_inputs)
    with measure.PeakMemory("cpu") as mem:
        out = harness._finalize(run())
    grad_bytes = sum(out[k].numel() * out[k].element_size() for k in ("grad_hidden", "grad_weight"))
    check = harness.compare(out, _reference(case_inputs, kind, references), case_inputs["shape"].dtype)
    assert check["agree"], check["disagreement"]
    shape = case_inputs["shape"]
    benchmark.group = f"{shape.key}-{kind}"
    benchmark.extra_info.update(peer=peer, loss_kind=kind, N=shape.N, D=shape.D, V=shape.V,
                                peak_extra_bytes=max(0, mem.peak - mem.base - grad_bytes),
                                loss_rel_err=check["loss_rel_err"],
                                grad_weight_rel_err=check["grad_weight_rel_err"])
    del out
    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    torch.set_grad_enabled(True)
