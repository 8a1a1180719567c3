#!/usr/bin/env bash
# The optional second GPU run, for when device time is left after benchmarks/gpu_core.sh: under
# 5 minutes (hard limit UPO_EXTRA_TOTAL_S = 270 s), each step bounded and written to $OUT as it ends:
#   1. wheels + env      as in gpu_core.sh -> env.json
#   2. train_padded      python3 -m upo.train on CUDA, bf16, 10 steps, padded rows   -> train.log
#   3. train_packed      the same with --packing                                     -> train.log
#   4. suite             UPO at the headline (naive, ours, the pick, TRL chunked) and the sweeps
#                        (length, vocab, hidden: naive, ours, CCE, TRL chunked); no new case
#                        starts after its budget -> gpu-extra-<date>.json
# plus extra.log and steps.jsonl: 5 files.
#
#   bash benchmarks/gpu_extra.sh [--out DIR] [--total S]
#   UPO_BENCH_PICK_ENV="UPO_FWD_IMPL=cublas UPO_LOGITS=input" bash benchmarks/gpu_extra.sh
#       # ours_triton_pick too: the "pick_env" of gpu_core.sh's decision.json ($OUT is emptied
#       # between device calls, so it is passed by hand)
#   UPO_EXTRA_QUICK=1 bash benchmarks/gpu_extra.sh      # one point per sweep
#   bash benchmarks/gpu_extra.sh --dry-run              # the same steps on CPU, tiny shapes
# Narrowing: UPO_EXTRA_SUITE_ARGS (more run_gpu.py arguments, e.g. --cases 'V256000'),
# UPO_GPU_SKIP="train_padded train_packed" (steps not to run).
#
# Device tool: run(command="bash benchmarks/gpu_extra.sh", carry=[".whl"], timeout_s=300).
source "$(dirname "$0")/gpu_lib.sh"
gpu_init extra "${UPO_EXTRA_TOTAL_S:-270}" "${UPO_EXTRA_DRY_TOTAL_S:-600}" "$@"
DRYFLAG=$([ "$DRY" = 1 ] && echo "--dry-run")
QUICK=$([ "${UPO_EXTRA_QUICK:-0}" = 1 ] && echo "--quick")
if [ "$DRY" = 1 ]; then
  TRAIN="--device cpu --precision fp32 --max-steps 2"; T_TRAIN=90; T_SUITE=240
else
  TRAIN="--device cuda --precision bf16 --max-steps 10"; T_TRAIN=45; T_SUITE=200
fi

WHEELS_RESERVE_S=180 install_wheels
step env 45 180 "$PY benchmarks/gpu_env.py --out '$OUT'"

# upo-train on CUDA (built-in tiny model and shipped data): padded rows, then packed rows
TRAIN_DIR=$(mktemp -d /tmp/upo-train.XXXXXX)
for mode in padded packed; do
  flag=$([ $mode = packed ] && echo "--packing")
  step "train_$mode" "$T_TRAIN" 100 \
    "{ echo '== upo-train $mode'; $PY -m upo.train $TRAIN $flag --no-progress --output-dir '$TRAIN_DIR/$mode' 2>&1 | tail -n 25; \
       rc=\${PIPESTATUS[0]}; echo '-- summary.json'; cat '$TRAIN_DIR/$mode/summary.json' 2>/dev/null; echo; exit \$rc; } >> '$OUT/train.log' 2>&1; \
     tail -n 12 '$OUT/train.log'"
done

# UPO at the headline and the sweeps; the driver stops starting cases at its budget
avail=$(( $(left) - 5 )); lim=$(( T_SUITE < avail ? T_SUITE : avail ))
grace=$(( lim / 4 < 30 ? lim / 4 : 30 )); budget=$(( lim - grace - 10 )); [ $budget -lt 10 ] && budget=10
step suite "$T_SUITE" 5 "$PY benchmarks/run_gpu.py $DRYFLAG $QUICK --part extra --pick-env '${UPO_BENCH_PICK_ENV:-}' --budget $budget --grace $grace --out '$OUT' ${UPO_EXTRA_SUITE_ARGS:-}"

gpu_finish
exit "$FINISH_RC"
