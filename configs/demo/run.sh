#!/usr/bin/env bash
# Quickstart: train a small teacher on the built-in synthetic dataset, then a vanilla student and a student
# distilled from the teacher with UFD, and print the three top-1 side by side. About 2 minutes on 2 CPU cores,
# no download. Run from anywhere:  bash configs/demo/run.sh   (OUT=folder to write elsewhere; default output/demo)
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-output/demo}
PYTHON=${PYTHON:-python}
CORES=$(nproc 2>/dev/null || echo 2)
mkdir -p "$OUT"

echo "[1/2] teacher (configs/demo/teacher.yaml) -> $OUT/teacher"
OMP_NUM_THREADS=$CORES "$PYTHON" train.py -c configs/demo/teacher.yaml --output "$OUT" --experiment teacher \
    --overwrite > "$OUT/teacher.log"
tail -n 1 "$OUT/teacher.log"

# the two students are independent: one core each
THREADS=$(( CORES > 1 ? CORES / 2 : 1 ))
echo "[2/2] vanilla and UFD students (configs/demo/vanilla.yaml, configs/demo/ufd.yaml), side by side"
OMP_NUM_THREADS=$THREADS "$PYTHON" train.py -c configs/demo/vanilla.yaml --output "$OUT" --experiment vanilla \
    --overwrite > "$OUT/vanilla.log" &
VANILLA=$!
OMP_NUM_THREADS=$THREADS "$PYTHON" train.py -c configs/demo/ufd.yaml --output "$OUT" --experiment ufd \
    --teacher-checkpoint "$OUT/teacher/checkpoint/last.pth.tar" --overwrite > "$OUT/ufd.log"
wait $VANILLA

"$PYTHON" - "$OUT" <<'PY'
import csv, sys
out = sys.argv[1]
def last(run):
    with open(f'{out}/{run}/summary.csv') as f:
        return float(list(csv.DictReader(f))[-1]['eval_top1'])
teacher, vanilla, ufd = last('teacher'), last('vanilla'), last('ufd')
print(f'\ntop-1 on the synthetic validation set (last epoch)')
print(f'  teacher          {teacher:6.2f}')
print(f'  student vanilla  {vanilla:6.2f}')
print(f'  student ufd      {ufd:6.2f}  ({ufd - vanilla:+.2f} over vanilla)')
print(f'logs and checkpoints: {out}/{{teacher,vanilla,ufd}}')
PY
