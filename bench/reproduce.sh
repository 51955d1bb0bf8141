#!/usr/bin/env bash
# Reproduce the paper's findings at CPU scale on the real CIFAR-10 Parquet (and the embedded digits).
# Each study is one self-contained file in bench/repro/studies/: its header says what it tests, how
# its CPU-scale settings differ from the paper's, its trial count and hours; the file fixes the
# design (grid, control, 5 seeds, metric val.acc.mean, the claims) before anything runs.
# For each study named (default: every file there except dc_dsa_cifar10, which is long):
#   ptmdd study  bench/repro/studies/STUDY.yaml --results $OUT/results --store $OUT/store [--resume] [SETS]
#   ptmdd rows   STUDY --results $OUT/results --out $ROWS/STUDY.parquet    (the per-trial rows)
#   ptmdd report --from $ROWS/STUDY.parquet --out $OUT/report/STUDY        (tables, claims, verdicts)
# Usage:
#   bash bench/reproduce.sh [STUDY ...]
#   RESUME=1 bash bench/reproduce.sh domain       # finish an interrupted study (finished trials kept)
#   SETS='--set samples=2 --set base.distill.iterations=2' bash bench/reproduce.sh dc_dsa_digits
#                                                  # extra overrides for every study (tiny test runs;
#                                                  # quoted as the shell quotes, never evaluated)
# Environment: OUT (default runs/repro: Tune results, MLflow database, PTM store, reports), ROWS
# (default bench/repro/rows), PTMDD (the ptmdd command, default .venv/bin/ptmdd; words split on
# spaces, e.g. PTMDD="python -m ptmdd_ray.cli"), RESUME, SETS.
# Exit status: 2 for an unknown study or a study file refused before it ran; 1 if a study had
# failed trials (its rows and report still written from the finished ones); else 0.
# The earlier runs (their per-study --set overrides on the shipped studies/*.yaml) are documented in
# REPRODUCTION.md; the study files here are their designs at the package's current defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/repro}
ROWS=${ROWS:-bench/repro/rows}
DIR=bench/repro/studies
read -r -a PTMDD_CMD <<< "${PTMDD:-.venv/bin/ptmdd}"
SET=()
if [ -n "${SETS:-}" ]; then  # split as the shell would (quotes kept together), without evaluating
  mapfile -t SET < <(printf '%s' "$SETS" | xargs printf '%s\n')
fi

if [ $# -gt 0 ]; then
  STUDIES=("$@")
else
  STUDIES=()
  for f in "$DIR"/*.yaml; do
    s=$(basename "$f" .yaml)
    [ "$s" = dc_dsa_cifar10 ] || STUDIES+=("$s")
  done
fi
for s in "${STUDIES[@]}"; do  # every name checked before anything runs
  s=$(basename "$s" .yaml)
  if [ ! -f "$DIR/$s.yaml" ]; then
    echo "reproduce.sh: no study $s (expected $DIR/$s.yaml; there: $(cd "$DIR" && ls -- *.yaml | sed 's/\.yaml$//' | tr '\n' ' '))" >&2
    exit 2
  fi
done

failed=()
for s in "${STUDIES[@]}"; do
  s=$(basename "$s" .yaml)
  echo "== $s: ptmdd study $DIR/$s.yaml ${SET[*]}" >&2
  rc=0
  "${PTMDD_CMD[@]}" study "$DIR/$s.yaml" --results "$OUT/results" --store "$OUT/store" ${RESUME:+--resume} \
    "${SET[@]}" || rc=$?
  if [ "$rc" -eq 1 ]; then  # some trials failed: the finished ones still make rows and a report
    echo "reproduce.sh: $s had failed trials; rows and report from its finished ones" >&2
    failed+=("$s")
  elif [ "$rc" -ne 0 ]; then
    echo "reproduce.sh: ptmdd study $s exited $rc; stopping" >&2
    exit "$rc"
  fi
  "${PTMDD_CMD[@]}" rows "$s" --results "$OUT/results" --out "$ROWS/$s.parquet"
  "${PTMDD_CMD[@]}" report --from "$ROWS/$s.parquet" --out "$OUT/report/$s"
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "reproduce.sh: failed trials in: ${failed[*]} (RESUME=1 bash bench/reproduce.sh ${failed[*]})" >&2
  exit 1
fi
