"""Smoke test of the benchmark harness on tiny CPU shapes (the real suites: benchmarks/README.md).

Runs the CPU runner (one process per case) on the naive and chunked-torch paths and the GPU
runner's --dry-run (the Triton peers under the interpreter, CUDA-only peers recorded as
skipped), then checks the JSON: environment, shapes with the matmul limit, one record per case
with time, peak extra memory and agreement, and the acceptance summary. The two GPU commands
(benchmarks/gpu_core.sh, gpu_extra.sh) run narrowed dry runs; the decision rule
(benchmarks/pick_default.py) runs on made-up results; results default to ./bench-results.
"""
from __future__ import annotations

import json
import os
import subprocess
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


def test_gpu_runner_dry_run(tmp_path, monkeypatch):
    """run_gpu.py --dry-run with no --out and no $OUT: the JSON lands in ./bench-results; the
    Triton peers run under the interpreter, the pick peer under its knobs, CCE is skipped."""
    from benchmarks import run_gpu

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OUT", raising=False)
    rc = run_gpu.main(["--dry-run", "--name", "gpu-dry.json", "--pick-env", "UPO_FWD_IMPL=cublas UPO_GROUP_MB=0.01",
                       "--cases", "B2-T32-*/naive/*", "--cases", "*/ours_triton_pick/*", "--cases", "B2-T32-*/cce/dpo"])
    assert rc == 0
    doc = _load(tmp_path / "bench-results", "gpu-dry")
    assert doc["suite"] == "gpu-dry-run" and doc["pick_env"] == {"UPO_FWD_IMPL": "cublas", "UPO_GROUP_MB": "0.01"}
    _check_common(doc, {("naive", "dpo"), ("naive", "upo"), ("ours_triton_pick", "dpo"), ("ours_triton_pick", "upo")})
    pick = [r for r in doc["results"] if r["peer"] == "ours_triton_pick"]
    assert all("UPO_FWD_IMPL=cublas" in r["note"] for r in pick), pick
    assert [r["status"] for r in doc["results"] if r["peer"] == "cce"] == ["skipped"]  # CUDA only


def test_default_output_is_outside_the_source_tree(tmp_path, monkeypatch):
    """--out, then $OUT, then ./bench-results under the current directory: git-ignored, not benchmarks/."""
    from benchmarks import common

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OUT", raising=False)
    assert common.out_dir(None, create=False) == str(tmp_path / "bench-results")
    monkeypatch.setenv("OUT", str(tmp_path / "o"))
    assert common.out_dir(None, create=False) == str(tmp_path / "o")
    assert common.out_dir(str(tmp_path / "x"), create=False) == str(tmp_path / "x")
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("OUT", raising=False)
    default = common.out_dir(None, create=False)
    assert not default.startswith(os.path.join(REPO, "benchmarks")) and not default.startswith(os.path.join(REPO, "upo"))
    if subprocess.run(["git", "-C", REPO, "rev-parse"], capture_output=True).returncode == 0:
        ignored = subprocess.run(["git", "-C", REPO, "check-ignore", "-q", os.path.join(default, "x.json")])
        assert ignored.returncode == 0, f"{default} is not ignored by git"
    # The shell commands too: no --out, no $OUT -> ./bench-results/<name>-...; every step skipped.
    env = _script_env(UPO_GPU_SKIP="wheels env gpu_tests probe suite decide train_padded train_packed")
    env.pop("OUT", None)
    for script in ("gpu_core.sh", "gpu_extra.sh"):
        proc = subprocess.run(["bash", os.path.join(REPO, "benchmarks", script), "--dry-run"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
        runs = sorted((tmp_path / "bench-results").glob(script.split("_")[1].split(".")[0] + "-dry-run-*"))
        assert runs and (runs[-1] / "steps.jsonl").exists(), proc.stdout[-2000:]


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script_env(**extra):
    """The environment a person's shell would give the GPU commands: no pytest or interpreter state."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTEST_", "TRITON_INTERPRET", "UPO_", "COV_", "OUT"))}
    env.update(PYTHON=sys.executable, **extra)
    return env


def _steps(out):
    with open(os.path.join(out, "steps.jsonl")) as f:
        return {s["step"]: s for s in map(json.loads, f)}


def test_gpu_core_dry_run(tmp_path):
    """benchmarks/gpu_core.sh --dry-run, narrowed: every step ok, at most 8 plain files in $OUT (what the
    device tool returns), the probe's grid with accuracy verdicts, the suite with the pick, the decision."""
    out = tmp_path / "core"
    env = _script_env(UPO_CORE_TESTS="tests/test_gpu.py", UPO_WHEEL_DIR=str(tmp_path / "no-wheels"),  # as in CI
                      UPO_GPU_SKIP="env", UPO_CORE_PYTEST_WORKERS="0",  # gpu_env.py: test_gpu_extra_dry_run
                      UPO_CORE_PROBE_ARGS="--impls cublas --logits fp32 --group-mb 0.015625,0.0078125",
                      UPO_CORE_SUITE_ARGS="--cases '*/naive/*' --cases '*/ours_triton_pick/*' --cases '*/cce/*'")
    proc = subprocess.run(["bash", os.path.join(REPO, "benchmarks", "gpu_core.sh"), "--dry-run", "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    steps = _steps(out)
    assert {s: steps[s]["status"] for s in ("gpu_tests", "probe", "suite", "decide")} == dict.fromkeys(
        ("gpu_tests", "probe", "suite", "decide"), "ok"), steps
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and {"core.log", "steps.jsonl", "gpu_tests.log", "probe_kernels.json",
                                "decision.json"} <= set(files), files
    assert "skipped" in (out / "gpu_tests.log").read_text()  # collected, needs CUDA
    probe = json.loads((out / "probe_kernels.json").read_text())
    assert probe["complete"] and probe["meta"]["dry_run"] and len(probe["variants"]) == 2
    assert [f["UPO_FWD_IMPL"] for f in probe["forward"]] == ["cublas"] and probe["forward"][0]["ms"] > 0
    for v in probe["variants"]:
        assert v["status"] == "ok" and v["ms"] > 0 and v["accurate"] is True, v
        assert set(v["accuracy"]) == {"logp", "grad_hidden", "grad_weight"}
    assert {tuple(v["tiles"]) for v in probe["variants"]} == {(256, 128), (128, 128)}  # 1 and 2 token groups
    dec = json.loads((out / "decision.json").read_text())
    assert dec["dry_run"] and dec["gpu_tests_passed"] is True and dec["probe"]["pick"]
    suite = _load(out, "gpu-dry-run-core")
    pick = [r for r in suite["results"] if r["peer"] == "ours_triton_pick"]
    if dec["pick_env"]:  # the probe's pick differs from the default: the suite measured it
        assert pick and pick[0]["status"] == "ok" and common_env(dec["pick_env"]) == suite["pick_env"]
    else:
        assert not pick
    assert dec["suite"]["peers"]["cce"]["status"] == "skipped"


def common_env(text):
    from benchmarks import common

    return common.parse_env(text)


def test_gpu_extra_dry_run(tmp_path):
    """benchmarks/gpu_extra.sh --dry-run without the training steps: env.json, the UPO headline and sweep cases."""
    out = tmp_path / "extra"
    env = _script_env(UPO_GPU_SKIP="train_padded train_packed", UPO_EXTRA_QUICK="1",
                      UPO_BENCH_PICK_ENV="UPO_FWD_IMPL=cublas",
                      UPO_EXTRA_SUITE_ARGS="--cases '*/naive/*' --cases '*/ours_triton_pick/*'")
    proc = subprocess.run(["bash", os.path.join(REPO, "benchmarks", "gpu_extra.sh"), "--dry-run", "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    steps = _steps(out)
    assert steps["suite"]["status"] == steps["env"]["status"] == "ok", steps
    assert steps["train_padded"]["status"] == "skipped-by-request", steps
    env_doc = json.loads((out / "env.json").read_text())
    assert env_doc["imports"]["torch"]["ok"] and env_doc["imports"]["upo"]["file"].startswith(REPO), env_doc["imports"]
    doc = _load(out, "gpu-dry-run-extra")
    got = {(r["peer"], r["loss_kind"], r["status"]) for r in doc["results"]}
    assert ("ours_triton_pick", "upo", "ok") in got and ("naive", "dpo", "ok") in got, got
    assert not any(k == "dpo" and r["shape"] == next(iter(doc["shapes"])) for r in doc["results"]
                   for k in [r["loss_kind"]]), "the headline DPO case belongs to gpu_core.sh"
    assert len(list(out.iterdir())) <= 8


def _probe_doc(rows, naive_extra=22.4e9, dry=False):
    def row(name, ms, extra, accurate=True, spread=0.5):
        impl, logits, group = name.split("/")
        env = {"UPO_FWD_IMPL": impl, "UPO_LOGITS": logits, "UPO_GROUP_MB": group[1:]}
        acc = {q: {"ok": accurate or q != "grad_weight"} for q in ("logp", "grad_hidden", "grad_weight")}
        return {"name": name, "env": env, "status": "ok", "ms": ms, "samples_ms": [ms, ms + spread],
                "extra_bytes": extra, "accuracy": acc, "accurate": accurate, "tiles": [4096, 4096]}
    return {"meta": {"dry_run": dry}, "shape": {"name": "headline"}, "complete": True,
            "default_env": {"UPO_FWD_IMPL": "fused", "UPO_LOGITS": "fp32", "UPO_GROUP_MB": "64"},
            "naive": {"extra_bytes": naive_extra}, "variants": [row(*r) for r in rows]}


def test_pick_default_rule(tmp_path):
    """Fastest variant that is accurate and lean; it replaces the default only beyond the noise and
    with the GPU tests passed; the targets come from the suite's headline DPO records."""
    from benchmarks import pick_default as pd

    mb = 2**20
    probe = _probe_doc([("fused/fp32/G64", 120.0, 130 * mb), ("cublas/input/G64", 100.0, 130 * mb, False),
                        ("cublas/fp32/G256", 104.0, 330 * mb), ("cublas/fp32/G64", 111.0, 130 * mb)])
    doc = pd.decide(probe, steps={"gpu_tests": {"rc": 0}})
    assert doc["probe"]["pick"]["name"] == "cublas/fp32/G64"  # not the inaccurate one, nor the one over 224 MB
    assert doc["recommendation"]["change"] is True
    assert doc["pick_env"] == "UPO_FWD_IMPL=cublas UPO_GROUP_MB=64 UPO_LOGITS=fp32"
    assert pd.decide(probe, steps={"gpu_tests": {"rc": 1}})["recommendation"]["change"] is False
    close = _probe_doc([("fused/fp32/G64", 111.3, 130 * mb), ("cublas/fp32/G64", 111.0, 130 * mb)])
    assert pd.decide(close, steps={"gpu_tests": {"rc": 0}})["recommendation"]["change"] is False  # within noise
    assert pd.decide(_probe_doc([("fused/fp32/G64", 100.0, 130 * mb)]))["recommendation"]["default_env"] == {}

    key = "B4-T2048-D4096-V128256-bfloat16"
    recs = [("naive", 101.0, 22.4e9), ("ours_triton", 120.0, 130e6), ("ours_triton_pick", 108.0, 130e6),
            ("trl_chunked", 110.0, 2.5e9), ("liger", 119.0, 3.9e9), ("cce", 311.0, 1.7e6)]
    suite = {"suite": "gpu", "shapes": {key: {"sweeps": ["headline", "length"]}},
             "results": [{"shape": key, "peer": p, "loss_kind": "dpo", "status": "ok", "median_ms": ms,
                          "peak_extra_bytes": b, "agree": True} for p, ms, b in recs]}
    doc = pd.decide(probe, suite, {"gpu_tests": {"rc": 0}})
    rec = doc["recommendation"]
    assert rec["suite_variant"] == "ours_triton_pick" and rec["all_targets_met"] is True, rec
    assert rec["targets_met"]["time_le_105ms"] is False and rec["suite_pick_minus_default_ms"] == -12.0
    assert doc["suite"]["ours"]["ours_triton"]["targets"]["faster_than_trl_chunked"] is False
    # the command line: files in, decision.json and the env string out
    (tmp_path / "p.json").write_text(json.dumps(probe))
    (tmp_path / "s.json").write_text(json.dumps(suite))
    (tmp_path / "steps.jsonl").write_text(json.dumps({"step": "gpu_tests", "rc": 0}) + "\n")
    assert pd.main(["--probe", str(tmp_path / "p.json"), "--suite", str(tmp_path / "s.json"), "--steps",
                    str(tmp_path / "steps.jsonl"), "--out", str(tmp_path / "d.json")]) == 0
    assert json.loads((tmp_path / "d.json").read_text())["recommendation"]["change"] is True


def test_probe_accuracy_verdict():
    """ours <= naive + 2e-4 |truth| per quantity; NaN never passes."""
    from benchmarks.probe_kernels import verdict

    norms = {"logp": 100.0, "grad_hidden": 10.0, "grad_weight": 10.0}
    naive = {"logp": 1.0, "grad_hidden": 0.1, "grad_weight": 0.1}
    ok, passed = verdict({"logp": 1.01, "grad_hidden": 0.1, "grad_weight": 0.05}, naive, norms)
    assert passed and ok["logp"]["ok"]
    _, passed = verdict({"logp": 0.5, "grad_hidden": 0.2, "grad_weight": 0.05}, naive, norms)
    assert not passed
    _, passed = verdict({"logp": float("nan"), "grad_hidden": 0.0, "grad_weight": 0.0}, naive, norms)
    assert not passed


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
