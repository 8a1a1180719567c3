#!/usr/bin/env bash
# Both GPU commands in a row, for a machine of your own (not for the device tool: up to ~9 minutes
# and 12 files, over its 8): benchmarks/gpu_core.sh into $OUT/core, then benchmarks/gpu_extra.sh
# into $OUT/extra with ours_triton_pick = the core run's pick (decision.json's pick_env).
#
#   bash benchmarks/gpu_all.sh [--quick] [--dry-run] [--out DIR]
#
# --quick: one point per sweep in the extra run. Through the device tool, call the two commands
# separately (benchmarks/README.md).
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
args=() out=""
while [ $# -gt 0 ]; do
  case $1 in
    --quick) export UPO_EXTRA_QUICK=1 ;;
    --dry-run) args+=(--dry-run) ;;
    --out) out=$2; shift ;;
    --out=*) out=${1#--out=} ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
out=${out:-${OUT:-$PWD/bench-results/all-$(date -u +%Y-%m-%d-%H%M%S)}}
bash "$here/gpu_core.sh" "${args[@]}" --out "$out/core"
core_rc=$?
pick=$(${PYTHON:-python3} -c "import json, sys; print(json.load(open(sys.argv[1])).get('pick_env', ''))" "$out/core/decision.json" 2>/dev/null)
UPO_BENCH_PICK_ENV="$pick" bash "$here/gpu_extra.sh" "${args[@]}" --out "$out/extra"
extra_rc=$?
echo "== gpu_all: core rc $core_rc, extra rc $extra_rc; results in $out/{core,extra}"
exit $(( core_rc || extra_rc ))
