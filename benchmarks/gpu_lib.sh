# Shared by benchmarks/gpu_core.sh and benchmarks/gpu_extra.sh (sourced, not run).
#
# gpu_init NAME TOTAL_S DRY_TOTAL_S "$@"   parses --dry-run / --out DIR / --total S, sets up $OUT,
#                                          the log ($OUT/NAME.log), steps.jsonl and the clock
# step NAME WANT_S RESERVE_S CMD           runs CMD (a string, bash -o pipefail -c) under timeout:
#                                          min(WANT_S, time left - RESERVE_S); skipped under MIN_STEP_S;
#                                          appends {"step", "rc", "status", "seconds", "limit_s"} to
#                                          $OUT/steps.jsonl; rc in STEP_RC[NAME]; a NAME listed
#                                          in $UPO_GPU_SKIP is not run (recorded "skipped-by-request")
# install_wheels                           .whl/*.whl ($UPO_WHEEL_DIR) -> a fresh temp site dir on PYTHONPATH
# gpu_finish                               step table, $OUT listing and its check (<= 8 files, plain
#                                          names, <= 2 folders down: what the device tool returns)
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
MIN_STEP_S="${MIN_STEP_S:-10}"
declare -A STEP_RC=()

gpu_init() {
  NAME=$1 TOTAL=$2; local dry_total=$3; shift 3
  DRY=0; local out_arg="" total_arg=""
  while [ $# -gt 0 ]; do
    case $1 in
      --dry-run) DRY=1 ;;
      --out) out_arg=$2; shift ;;
      --out=*) out_arg=${1#--out=} ;;
      --total) total_arg=$2; shift ;;
      --total=*) total_arg=${1#--total=} ;;
      -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
      *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
  done
  [ "$DRY" = 1 ] && TOTAL=$dry_total
  TOTAL=${total_arg:-$TOTAL}
  # Results: --out, else $OUT (the device tool's), else ./bench-results/<name>-<time> (git-ignored).
  local stamp; stamp=$(date -u +%Y-%m-%d-%H%M%S)
  OUT=${out_arg:-${OUT:-$PWD/bench-results/$NAME$([ "$DRY" = 1 ] && echo -dry-run)-$stamp}}
  mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)" || { echo "cannot create $OUT" >&2; exit 2; }
  export OUT
  cd "$REPO" || exit 2
  export PYTHONUNBUFFERED=1
  export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's code, whatever is installed
  : > "$OUT/steps.jsonl"
  exec > >(tee -a "$OUT/$NAME.log") 2>&1
  TEE_PID=$!
  SECONDS=0
  echo "== $NAME$([ "$DRY" = 1 ] && echo ' (dry run on CPU)'): total limit ${TOTAL} s; results in $OUT"
  echo "   $(date -u +%FT%TZ); repo $REPO; $($PY --version 2>&1)"
}

left() { echo $(( TOTAL - SECONDS )); }

record() {  # record NAME RC STATUS SECONDS LIMIT
  printf '{"step": "%s", "rc": %s, "status": "%s", "seconds": %s, "limit_s": %s, "at_s": %s}\n' \
    "$1" "$2" "$3" "$4" "$5" "$SECONDS" >> "$OUT/steps.jsonl"
  STEP_RC[$1]=$2
}

step() {
  local name=$1 want=$2 reserve=$3 cmd=$4
  if [[ " ${UPO_GPU_SKIP:-} " == *" $name "* ]]; then
    echo "== [$name] skipped (UPO_GPU_SKIP)"
    record "$name" 0 skipped-by-request 0 0
    return 0
  fi
  local avail=$(( $(left) - reserve ))
  local lim=$(( want < avail ? want : avail ))
  if [ "$lim" -lt "$MIN_STEP_S" ]; then
    echo "== [$name] skipped: ${lim} s left for it (total ${TOTAL} s)"
    record "$name" -1 skipped 0 "$lim"
    return 0
  fi
  echo "== [$name] limit ${lim} s (at ${SECONDS} s of ${TOTAL} s)"
  local t0=$SECONDS rc status
  timeout -k 5 "$lim" bash -o pipefail -c "$cmd"
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status=timeout ;;
    *) status=failed ;;
  esac
  record "$name" "$rc" "$status" $(( SECONDS - t0 )) "$lim"
  echo "== [$name] $status (rc $rc) in $(( SECONDS - t0 )) s"
  return 0
}

install_wheels() {  # the wheels in ${UPO_WHEEL_DIR:-.whl}
  SITE=$(mktemp -d /tmp/upo-site.XXXXXX)
  export SITE
  local dir=${UPO_WHEEL_DIR:-.whl}
  if ! ls "$dir"/*.whl >/dev/null 2>&1; then
    echo "no wheels in $dir/: TRL, Liger and CCE will be reported as not installed (bash benchmarks/fetch_wheels.sh)"
    record wheels 0 "no-wheels" 0 0
    return 0
  fi
  local flags="" pyv
  pyv=$($PY -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  if [ "$pyv" != "3.12" ]; then
    if [ "$DRY" = 1 ]; then
      flags="--python-version 3.12 --implementation cp --only-binary=:all:"
      echo "dry run on Python $pyv: the wheels are installed as for the GPU image's CPython 3.12"
    else
      echo "WARNING: Python $pyv here; .whl/ was fetched for the GPU image's 3.12"
    fi
  fi
  ls -l "$dir"/*.whl | awk '{print "   " $5 "  " $NF}'
  step wheels 45 "${WHEELS_RESERVE_S:-0}" \
    "$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade $flags --target '$SITE' '$dir'/*.whl"
  if [ "${STEP_RC[wheels]}" = 0 ]; then
    export PYTHONPATH="$REPO:$SITE${PYTHONPATH#$REPO}"
    echo "   installed into $SITE (on PYTHONPATH)"
  else
    echo "   wheel install failed: the peers that need them will be reported as not installed"
  fi
}

gpu_finish() {
  echo "== steps ($SECONDS s of ${TOTAL} s):"
  $PY - "$OUT/steps.jsonl" <<'EOF'
import json, sys
for line in open(sys.argv[1]):
    s = json.loads(line)
    print(f"   {s['step']:<14} {s['status']:<9} rc {s['rc']:>4}  {s['seconds']:>4} s (limit {s['limit_s']} s)")
EOF
  local bad=0 files
  files=$(cd "$OUT" && find . -type f | sed 's#^\./##' | sort)
  echo "== $OUT: $(echo "$files" | grep -c .) files"
  for f in $files; do
    echo "   $f ($(wc -c < "$OUT/$f") bytes)"
    if ! [[ $f =~ ^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+){0,2}$ ]]; then
      echo "   ^ not returned by the device tool (name or depth)"; bad=1
    fi
  done
  if [ "$(echo "$files" | grep -c .)" -gt 8 ]; then
    echo "   more than 8 files: the device tool returns 8 at most"; bad=1
  fi
  local failed=0 s
  for s in "${!STEP_RC[@]}"; do
    [ "${STEP_RC[$s]}" = 0 ] || failed=1
  done
  FINISH_RC=$(( bad || failed ))
  echo "== $NAME done in $SECONDS s: $([ $FINISH_RC = 0 ] && echo 'every step ok' || echo 'SOME STEP FAILED or files not returnable')"
  exec >&- 2>&-
  wait "$TEE_PID" 2>/dev/null
  return 0
}
