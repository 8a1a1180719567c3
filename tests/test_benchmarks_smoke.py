"""Smoke test of the benchmark harness on tiny CPU shapes (the real suites: benchmarks/README.md).

Runs the CPU runner (one process per case) on the naive and chunked-torch paths and the GPU
runner's --dry-run on the naive path (its CUDA-only peers are recorded as skipped), then checks
the JSON: environment, shapes with the matmul limit, one
record per case with time, peak extra memory and agreement, and the acceptance summary.
"""
from __future__ import annotations

import json
import os
import sys

import pytest

# benchmarks/ is not an installed package: import it from the checkout.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytest.importorskip("matplotlib")


def _load(folder, prefix):
    files = [f for f in os.listdir(folder) if f.startswith(prefix) and f.endswith(".json")]
    assert len(files) == 1, files
    with open(os.path.join(folder, files[0])) as f:
        return json.load(f)


def _check_common(doc, expected_cases):
    env = doc["environment"]
    assert env["device"] and env["date"] and env["versions"]["torch"]
    assert doc["shapes"], "no shape recorded"
    for info in doc["shapes"].values():
        assert {"B", "T", "D", "V", "N", "dtype"} <= set(info)
    got = {(r["peer"], r["loss_kind"]) for r in doc["results"]}
    assert expected_cases <= got, (expected_cases, got)
    for r in doc["results"]:
        if (r["peer"], r["loss_kind"]) not in expected_cases:
            continue
        assert r["status"] == "ok", r
        assert r["median_ms"] > 0 and r["first_call_ms"] > 0
        assert r["peak_extra_bytes"] >= 0 and r["base_bytes"] > 0 and r["mem_method"]
        if r["peer"] == "naive":
            assert r.get("is_reference"), r
        else:
            assert r["agree"] is True, r
            assert r["loss_rel_err"] < 2e-3 and r["grad_weight_rel_err"] < 2e-3


def test_cpu_runner_smoke(tmp_path):
    from benchmarks import run_cpu

    run_cpu.main(["--smoke", "--out", str(tmp_path), "--name", "cpu-smoke.json", "--timeout", "120",
                  "--cases", "*/naive/*", "--cases", "*/ours_torch/*"])
    doc = _load(tmp_path, "cpu-smoke")
    assert doc["suite"] == "cpu"
    _check_common(doc, {("naive", "dpo"), ("ours_torch", "dpo"), ("naive", "upo"), ("ours_torch", "upo")})
    for info in doc["shapes"].values():
        assert info["matmul_limit"]["limit_ms"] > 0
    acc = doc["acceptance"]["dpo"]
    assert {"memory_ratio", "time_ratio", "memory_ok", "time_ok"} <= set(acc)
    assert os.path.exists(tmp_path / "cpu-smoke.md")
    text = (tmp_path / "cpu-smoke.md").read_text()
    assert "ours_torch" in text and "naive" in text


def test_gpu_runner_dry_run(tmp_path):
    from benchmarks import run_gpu

    rc = run_gpu.main(["--dry-run", "--out", str(tmp_path), "--name", "gpu-dry.json",
                       "--cases", "B2-T64-*/naive/*", "--cases", "B2-T64-*/ours_triton*/*"])
    assert rc == 0
    doc = _load(tmp_path, "gpu-dry")
    assert doc["suite"] == "gpu-dry-run"
    _check_common(doc, {("naive", "dpo"), ("naive", "upo")})
    triton = [r for r in doc["results"] if r["peer"].startswith("ours_triton")]
    assert {r["peer"] for r in triton} == {"ours_triton", "ours_triton_cublas_fwd", "ours_triton_input_logits"}
    assert all(r["status"] == "skipped" for r in triton)  # CUDA-only on a CPU dry run


def test_render_from_results(tmp_path):
    from benchmarks import render

    doc = {"suite": "cpu", "environment": {"device": "CPU: test", "date": "2026-01-01T00:00:00Z",
                                           "versions": {"torch": "x"}},
           "shapes": {}, "results": []}
    for n, (t_naive, t_ours) in zip((1024, 2048, 4096), ((10, 12), (20, 23), (40, 45))):
        key = f"B1-T{n // 2}-D8-V16-float32"
        doc["shapes"][key] = {"B": 1, "T": n // 2, "D": 8, "V": 16, "N": n, "dtype": "float32",
                              "sweeps": ["length"], "matmul_limit": {"limit_ms": t_naive / 2, "tflops": 1.0}}
        for peer, t, mem in (("naive", t_naive, n * 1000), ("ours_torch", t_ours, 1000)):
            doc["results"].append({"shape": key, "peer": peer, "loss_kind": "dpo", "status": "ok",
                                   "median_ms": t, "first_call_ms": t, "peak_extra_bytes": mem,
                                   "agree": True, "loss_rel_err": 0, "grad_hidden_rel_err": 0,
                                   "grad_weight_rel_err": 0})
    path = tmp_path / "cpu-x.json"
    path.write_text(json.dumps(doc))
    md = render.render_files([str(path)])
    assert os.path.exists(md) and os.path.exists(tmp_path / "cpu-x-length.png")
