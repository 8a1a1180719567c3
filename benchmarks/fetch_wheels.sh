#!/usr/bin/env bash
# Download the wheels the benchmark peers need on the GPU image into .whl/ (git-ignored), for
# the device tool to carry: run(..., carry=[".whl"]).
#
#   bash benchmarks/fetch_wheels.sh            # into ./.whl (the repository root's)
#   WHEEL_DIR=/some/dir bash benchmarks/fetch_wheels.sh
#
# The GPU image (/work/.library/device/KINDS.md) is Python 3.12 with torch 2.11, triton 3.6,
# transformers 5.17, accelerate, pandas, pyarrow, xxhash, fsspec, huggingface-hub, requests,
# tqdm: everything TRL, Liger-Kernel and Cut Cross-Entropy import except what is listed here.
# --no-deps: each missing dependency is named. One version of each package (two stop the
# install there). The total must stay far under the device tool's 64 MiB limit for the whole
# working tree; this script fails if it is over MAX_MB (default 48).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="${WHEEL_DIR:-.whl}"
MAX_MB="${MAX_MB:-48}"
PY="${PYTHON:-python3}"

# name==version: peers first, then what `trl.trainer.utils` imports that the image lacks.
WHEELS=(
  liger-kernel==0.8.5
  cut-cross-entropy==25.1.1
  trl==1.16.0
  datasets==5.2.0
  dill==0.4.1
  multiprocess==0.70.19
)

mkdir -p "$DEST"
if [ "$DEST" = ".whl" ] && git rev-parse --git-dir >/dev/null 2>&1 && ! git check-ignore -q .whl/x.whl; then
  echo "ERROR: .whl/ is not ignored by git (.gitignore should hold /.whl/)" >&2
  exit 1
fi

# Drop other versions of the same packages left from earlier fetches (one version each).
for spec in "${WHEELS[@]}"; do
  name="${spec%%==*}"; version="${spec##*==}"
  norm="$(echo "$name" | tr '-' '_')"
  for f in "$DEST"/"$norm"-*.whl "$DEST"/"$name"-*.whl; do
    [ -e "$f" ] || continue
    case "$(basename "$f")" in
      "$norm-$version-"*|"$name-$version-"*) ;;
      *) echo "removing other version $(basename "$f")"; rm -f "$f" ;;
    esac
  done
done

"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
  -d "$DEST" "${WHEELS[@]}"

# Every requested package present exactly once.
status=0
for spec in "${WHEELS[@]}"; do
  norm="$(echo "${spec%%==*}" | tr '-' '_')"
  count=$(ls "$DEST" | grep -ci "^${norm}-[0-9]" || true)
  if [ "$count" -ne 1 ]; then
    echo "ERROR: expected one wheel of ${spec%%==*} in $DEST, found $count" >&2
    status=1
  fi
done

ls -l "$DEST"/*.whl
bytes=$(cat "$DEST"/*.whl | wc -c)
mb=$(awk -v b="$bytes" 'BEGIN { printf "%.2f", b / 1048576 }')
echo "total: $mb MiB in $(ls "$DEST"/*.whl | wc -l) wheels ($DEST); limit $MAX_MB MiB (device tool: 64 MiB for the whole tree)"
if awk -v b="$bytes" -v m="$MAX_MB" 'BEGIN { exit !(b > m * 1048576) }'; then
  echo "ERROR: the wheels are over $MAX_MB MiB" >&2
  exit 1
fi
exit $status
