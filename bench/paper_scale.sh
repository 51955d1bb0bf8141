#!/usr/bin/env bash
# Paper-scale points on one CUDA GPU (issue 25): CIFAR-10 IPC 10, ConvNet (width 128), DM 20,000
# iterations with 256 real images per class, 2 ConvNet PTMs (the reference's recipe, epoch 10),
# evaluation 5 models x 1000 epochs; plain DM and DM + CLoM beside the published DM 48.9 ± 0.6.
# Within 9 minutes on one H100: the evaluation count is cut before the distillation if it must be,
# and the output says so (bench/paper_scale.py). It installs nothing (.venv/bin/python if there,
# else python3), needs no Ray, and reads the CIFAR-10 Parquet from $CIFAR10, shared/data or
# ../shared/data (carry it to the GPU machine). JSON to $OUT/paper_scale.json (default
# runs/paper_scale/), the table to stderr. Without CUDA it says so and exits 0.
#
#   bash bench/paper_scale.sh
#   ITERATIONS=20000 EVAL_RUNS=5 EVAL_EPOCHS=1000 BUDGET_S=540 bash bench/paper_scale.sh
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
DATA=""
for f in "${CIFAR10:-}" shared/data/cifar10-jpeg.parquet ../shared/data/cifar10-jpeg.parquet; do
    if [ -n "$f" ] && [ -f "$f" ]; then DATA="parquet:$(cd "$(dirname "$f")" && pwd)/$(basename "$f")"; break; fi
done
if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "paper_scale: no CUDA device here (torch.cuda.is_available() is False with $PY): nothing to run."
    [ -n "$DATA" ] || echo "paper_scale: note: no cifar10-jpeg.parquet in \$CIFAR10, shared/data or ../shared/data either"
    exit 0
fi
if [ -z "$DATA" ]; then
    echo "paper_scale: no cifar10-jpeg.parquet in \$CIFAR10, shared/data or ../shared/data: carry it along" >&2
    exit 2
fi
DEST=${OUT:-$ROOT/runs/paper_scale}
mkdir -p "$DEST"
exec "$PY" bench/paper_scale.py --data "$DATA" --iterations "${ITERATIONS:-20000}" --eval-runs "${EVAL_RUNS:-5}" \
    --eval-epochs "${EVAL_EPOCHS:-1000}" --budget-s "${BUDGET_S:-540}" --device cuda --out "$DEST/paper_scale.json" \
    > "$DEST/paper_scale.stdout"
