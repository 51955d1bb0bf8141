#!/usr/bin/env bash
# Accuracy figures of BENCHMARKS.md: DM, DM+CLoM and random real on digits (IPC 1, 10) and
# CIFAR-10 from the Parquet (IPC 10, CPU scale). Usage: bash bench/accuracy.sh [OUTDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/accuracy}
P=.venv/bin/ptmdd
for ipc in 1 10; do
  $P distill studies/digits.yaml --set distill.ipc=$ipc --set loss.clom=0 --out $out/digits_ipc${ipc}_dm -q
  $P distill studies/digits.yaml --set distill.ipc=$ipc --out $out/digits_ipc${ipc}_dm_clom -q
done
$P distill studies/cifar10_cpu.yaml --set loss.clom=0 --out $out/cifar10_ipc10_dm -q
$P distill studies/cifar10_cpu.yaml --out $out/cifar10_ipc10_dm_clom -q
$P distill studies/cifar10_cpu.yaml --set loss.augmented=false --set loss.clom=1000 --out $out/cifar10_ipc10_dm_clom_raw -q
.venv/bin/python bench/summarize.py $out
