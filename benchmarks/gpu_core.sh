#!/usr/bin/env bash
# The GPU run that decides the default, in about 4 minutes (hard limit UPO_CORE_TOTAL_S = 270 s,
# the carried wheels' install included). Each step has its own time limit and writes to $OUT as
# soon as it ends, in this order:
#   1. wheels + env      carried .whl/ into a temp site dir; device, versions, which peers import
#                        -> env.json
#   2. gpu_tests         pytest -m gpu: compiles every Triton kernel variant on the image's Triton
#                        and checks it (fp32 vs float64, bf16 no worse than naive, memory)
#                        -> gpu_tests.log
#   3. probe             the variants at the headline (UPO_FWD_IMPL x UPO_LOGITS x UPO_GROUP_MB):
#                        time, extra memory, bf16 error vs naive on the same inputs -> probe_kernels.json
#   4. suite             the headline DPO case (N = 16k, D = 4096, V = 128256, bf16) with every
#                        peer: naive, ours (default, the probe's pick, variants), TRL chunked and
#                        selective, Liger, CCE -> gpu-core-<date>.json
#   5. decide            benchmarks/pick_default.py -> decision.json (the pick, the targets)
# plus core.log (everything printed) and steps.jsonl (each step's exit code and time): 7 files.
#
#   bash benchmarks/gpu_core.sh [--out DIR] [--total S]     # on the GPU machine
#   bash benchmarks/gpu_core.sh --dry-run                   # the same steps on CPU, tiny shapes
#
# Device tool: run(command="bash benchmarks/gpu_core.sh", carry=[".whl"], timeout_s=300)
# (benchmarks/fetch_wheels.sh fills .whl/ first). Results: --out, else $OUT, else
# ./bench-results/core-<time>/ (git-ignored). Step limits (s): env 45, tests 85, probe 75,
# suite 110, decide 20, each cut to leave the later steps their share of the total.
# Narrowing (reruns, the CPU smoke test): UPO_CORE_TESTS (pytest paths, default tests/),
# UPO_CORE_PROBE_ARGS, UPO_CORE_SUITE_ARGS (more arguments of probe_kernels.py / run_gpu.py),
# UPO_CORE_PYTEST_WORKERS (pytest-xdist processes, default 4; 0: one), UPO_GPU_SKIP="gpu_tests
# probe ..." (steps not to run). Quote globs for the inner shell: UPO_CORE_SUITE_ARGS="--cases '*/cce/*'".
source "$(dirname "$0")/gpu_lib.sh"
gpu_init core "${UPO_CORE_TOTAL_S:-270}" "${UPO_CORE_DRY_TOTAL_S:-600}" "$@"
DRYFLAG=$([ "$DRY" = 1 ] && echo "--dry-run")
if [ "$DRY" = 1 ]; then  # CPU: 2 cores, the Triton interpreter
  T_ENV=90; T_TESTS=150; T_PROBE=120; T_SUITE=150; NPROC=2
else
  T_ENV=45; T_TESTS=85; T_PROBE=75; T_SUITE=110; NPROC=4
fi

# 1. wheels + env (the rest of the run needs ~200 s: leave it)
WHEELS_RESERVE_S=200 install_wheels
step env "$T_ENV" 190 "$PY benchmarks/gpu_env.py --out '$OUT'"

# 2. the GPU tests (leave ~140 s for probe + suite + decide)
XDIST=""
NPROC=${UPO_CORE_PYTEST_WORKERS:-$NPROC}  # 0: one process
[ "$NPROC" -gt 0 ] && $PY -c "import xdist" 2>/dev/null && XDIST="-n $NPROC"
step gpu_tests "$T_TESTS" 140 \
  "UPO_TEST_GPU=1 $PY -m pytest -q -m gpu ${UPO_CORE_TESTS:-tests/} -p no:cacheprovider $XDIST --durations=15 -rfEs 2>&1 | tee '$OUT/gpu_tests.log'"

# 3. the variant probe at the headline (leave ~90 s for suite + decide); no new variant starts
#    in the last 15 s of its limit
avail=$(( $(left) - 90 )); lim=$(( T_PROBE < avail ? T_PROBE : avail ))
step probe "$T_PROBE" 90 "$PY benchmarks/probe_kernels.py $DRYFLAG --out '$OUT' --budget $(( lim > 30 ? lim - 15 : 15 )) ${UPO_CORE_PROBE_ARGS:-}"

# 4. the headline DPO case with every peer, ours_triton_pick = the probe's fastest accurate variant
PICK=""
if [ -f "$OUT/probe_kernels.json" ]; then
  PICK=$(timeout 30 $PY benchmarks/pick_default.py --probe "$OUT/probe_kernels.json" --print-env 2>/dev/null | tail -n 1)
fi
echo "== the probe's pick: ${PICK:-(none, or the library default)}"
avail=$(( $(left) - 15 )); lim=$(( T_SUITE < avail ? T_SUITE : avail ))
grace=$(( lim / 4 < 30 ? lim / 4 : 30 )); budget=$(( lim - grace - 10 )); [ $budget -lt 10 ] && budget=10
step suite "$T_SUITE" 15 "$PY benchmarks/run_gpu.py $DRYFLAG --part core --pick-env '$PICK' --budget $budget --grace $grace --out '$OUT' ${UPO_CORE_SUITE_ARGS:-}"

# 5. the decision
SUITE_JSON=$(ls -t "$OUT"/gpu*-core-*.json 2>/dev/null | head -n 1)
step decide 20 0 "$PY benchmarks/pick_default.py --probe '$OUT/probe_kernels.json' ${SUITE_JSON:+--suite '$SUITE_JSON'} --steps '$OUT/steps.jsonl' --out '$OUT/decision.json'"

gpu_finish
exit "$FINISH_RC"
