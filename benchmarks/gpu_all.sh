#!/usr/bin/env bash
# One GPU session: carried wheels -> the GPU tests -> kernel probe -> upo-train on CUDA -> the
# benchmark suite. Ends within ~9.5 minutes (UPO_GPU_TOTAL_S).
#
#   bash benchmarks/gpu_all.sh [run_gpu.py options, e.g. --quick]
#
# Expects the peers' wheels in .whl/ (see benchmarks/README.md: liger-kernel, cut-cross-entropy,
# trl and the trl dependencies the GPU image lacks). Logs and JSON go to $OUT (or
# benchmarks/results): gpu_tests.log, probe.log + probe_kernels.json, gpu_train.log,
# gpu_bench.log, gpu-<date>.json.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
TOTAL=${UPO_GPU_TOTAL_S:-560}          # whole script, seconds
start=$(date +%s)
left() { echo $(( TOTAL - ($(date +%s) - start) )); }

echo "== environment"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>/dev/null || true

echo "== carried wheels"
if ls .whl/*.whl >/dev/null 2>&1; then
  if timeout 40 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
       --target /tmp/site .whl/*.whl; then
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "wheel install failed: peers that need them will be reported as not installed"
  fi
else
  echo "no .whl/ folder: Liger, CCE and TRL will be reported as not installed"
fi
timeout 60 python3 - <<'EOF' || true
import importlib, torch, triton
print("torch", torch.__version__, "triton", triton.__version__,
      torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA")
for mod in ("transformers", "trl", "liger_kernel", "cut_cross_entropy", "datasets"):
    try:
        m = importlib.import_module(mod)
        print(f"  {mod} {getattr(m, '__version__', '?')}")
    except Exception as exc:
        print(f"  {mod}: not importable ({type(exc).__name__}: {exc})")
EOF

TESTS_S=${UPO_GPU_TESTS_S:-90}         # GPU tests, seconds
[ "$(left)" -lt $(( TESTS_S + 200 )) ] && TESTS_S=$(( $(left) - 200 > 20 ? $(left) - 200 : 20 ))
echo "== GPU tests (limit ${TESTS_S} s)"
UPO_TEST_GPU=1 timeout "$TESTS_S" python3 -m pytest -q -m gpu tests/ -p no:cacheprovider \
  2>&1 | tee "$OUT/gpu_tests.log"
rc=${PIPESTATUS[0]}
case $rc in
  0) ;;
  5) echo "(no GPU tests collected)" | tee -a "$OUT/gpu_tests.log" ;;
  124) echo "(GPU tests stopped by their time limit)" | tee -a "$OUT/gpu_tests.log" ;;
  *) echo "(GPU tests exited with $rc)" | tee -a "$OUT/gpu_tests.log" ;;
esac

PROBE_S=${UPO_GPU_PROBE_S:-90}        # kernel variants (forward impl x token-group budget)
[ "$(left)" -lt $(( PROBE_S + 200 )) ] && PROBE_S=$(( $(left) - 200 > 20 ? $(left) - 200 : 20 ))
echo "== kernel probe (limit ${PROBE_S} s)"
timeout "$PROBE_S" python3 benchmarks/probe_kernels.py --quick 2>&1 | tee "$OUT/probe.log"

TRAIN_S=${UPO_GPU_TRAIN_S:-45}         # upo-train on CUDA: padded, then packed rows
echo "== upo-train on CUDA (limit ${TRAIN_S} s each)"
for extra in "" "--packing"; do
  timeout "$TRAIN_S" python3 -m upo.cli --device cuda --precision bf16 --max-steps 10 --no-progress \
    --output-dir /tmp/upo-gpu-run $extra 2>&1 | tail -n 15 | tee -a "$OUT/gpu_train.log"
  echo "(upo-train $extra exited with ${PIPESTATUS[0]})" | tee -a "$OUT/gpu_train.log"
done

remaining=$(left)
bench_timeout=$(( remaining < 340 ? remaining : 340 ))
budget=$(( bench_timeout - 75 ))
[ $budget -lt 30 ] && budget=30
echo "== benchmarks (stop starting cases after ${budget} s, hard limit ${bench_timeout} s)"
timeout "$bench_timeout" python3 benchmarks/run_gpu.py --budget "$budget" --grace 45 --out "$OUT" "$@" \
  2>&1 | tee "$OUT/gpu_bench.log"
echo "== done in $(( $(date +%s) - start )) s; files in $OUT:"
ls -la "$OUT"
