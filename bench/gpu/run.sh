#!/usr/bin/env bash
# The GPU kit: one command on a bare GPU machine (docs/gpu.md). Runs the four parts, each under a
# hard time limit and in its own process, so a part that fails, runs out of memory or hangs is
# recorded and the next one still runs; then writes $OUT/gpu-report.md and $OUT/gpu-report.json
# (and $OUT/gpu-log.txt, the whole console output).
#
#   bash bench/gpu/run.sh             # on the GPU machine: about 8 minutes
#   bash bench/gpu/run.sh --dry-run   # every part at toy size on the CPU: checks the script (~1 min)
set -u
cd "$(dirname "$0")/../.."
DRY=""
[ "${1:-}" = "--dry-run" ] && DRY="--dry-run"
PY="${PYTHON:-python3}"
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/ffid-gpu.XXXXXX")"
LOG="$OUT/gpu-log.txt"
: > "$LOG"
exec > >(tee -a "$LOG") 2>&1
TEE=$!
START=$(date +%s)
echo "ffid GPU kit ${DRY:-(full run)}: $(date -u +%FT%TZ), work folder $WORK, out $OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore TOKENIZERS_PARALLELISM=false
# What the image lacks comes from the carried wheels (bench/gpu/prepare.sh); not in a dry run,
# which uses the environment it is started in.
if [ -z "$DRY" ] && ls .whl/*.whl >/dev/null 2>&1; then
    SITE=/tmp/site
    "$PY" bench/gpu/install.py .whl "$SITE"
    export PYTHONPATH="$PYTHONPATH:$SITE"
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv

# part, soft budget (s: no new case starts after it), hard limit (s: the process is killed).
# Hard limits add up to 515 s, so with installing and the report the run stays under the
# device tool's 600 s per command even if every part hangs.
PARTS="tests:70:90 shapes:130:170 14b:150:190 paths:45:65"
if [ -n "$DRY" ]; then PARTS="tests:60:90 shapes:60:90 14b:60:90 paths:30:60"; fi
for spec in $PARTS; do
    IFS=: read -r name soft hard <<< "$spec"
    echo "== part $name (budget ${soft} s, limit ${hard} s) at $(( $(date +%s) - START )) s"
    timeout -k 10 "$hard" "$PY" "bench/gpu/part_$name.py" --work "$WORK" --budget "$soft" $DRY
    rc=$?
    echo "$rc" > "$WORK/rc-$name"
    echo "== part $name: exit $rc"
done
"$PY" bench/gpu/report.py --work "$WORK" --out "$OUT" $DRY
echo "done in $(( $(date +%s) - START )) s"
# The files in $OUT are collected when this script exits: let tee write the log's last lines first.
exec 1>&- 2>&-
wait "$TEE"
