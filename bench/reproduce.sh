#!/usr/bin/env bash
# Reproduce the paper's findings at CPU scale on the real CIFAR-10 Parquet: each shipped study with
# CIFAR-10 settings (ConvNetW32, IPC 10, 200 DM iterations, PTMs trained on 500 images per class,
# 3 eval models x 300 epochs, 3 samples = 3 seeds per point), then `ptmdd report` with the paired
# tests and verdicts. Results, MLflow store and reports under $OUT (default runs/repro).
#   bash bench/reproduce.sh [epochs diversity domain loss_weights cross_arch loss_weights_ipc1 loss_weights_alpha
#                            loss_weights_beta1]
#   RESUME=1 bash bench/reproduce.sh domain    # finish an interrupted study (finished trials kept)
# The paper's settings (issue 12): cclom_strength (beta up to 1000, 8192 real images per CCLoM step),
# disjoint (PTMs of classes 0-4 guide a target of classes 5-9, 2048 per step), overtrained (150-epoch PTMs, checkpoints
# 2..150, ALPHA = the CLoM weight chosen on validation by loss_weights_alpha, default 30).
# Every study holds out VAL images per class (default 200) of the training split: choices read them.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-parquet:../shared/data/cifar10-jpeg.parquet}
OUT=${OUT:-runs/repro}
STUDIES=${*:-epochs diversity domain loss_weights cross_arch}
SRC="{name: $DATA, train_per_class: 500}"
VAL=${VAL:-200}
ALPHA=${ALPHA:-30.0}
COMMON=(--set "base.dataset.name=$DATA" --set base.dataset.val_per_class=$VAL --set base.distill.ipc=10 --set base.distill.iterations=200
        --set base.distill.batch_real=64 --set base.eval.runs=3 --set base.eval.epochs=300 --set samples=3
        --set max_concurrent=2)
for s in $STUDIES; do
  case $s in
    domain)  # every case names its PTM source; on CIFAR-10 each trains on 500 images per class
      extra=(--set "cases=[{pool.source: $SRC, loss.clom: 0.0, loss.cclom: 0.0},
        {pool.source: $SRC, loss.clom: 30.0, loss.cclom: 0.0},
        {pool.source: {name: $DATA, train_per_class: 500, domain: invert}, loss.clom: 30.0, loss.cclom: 0.0},
        {pool.source: {name: $DATA, train_per_class: 500, domain: lowres}, loss.clom: 30.0, loss.cclom: 0.0},
        {pool.source: {name: $DATA, train_per_class: 1000, classes: [0, 1, 2, 3, 4]}, loss.clom: 0.0, loss.cclom: 1.0},
        {pool.source: $SRC, loss.clom: 0.0, loss.cclom: 1.0}]"
        --set "control={pool.source: $SRC, loss.clom: 0.0, loss.cclom: 0.0}"
        --set "claims=[{claim: target-domain PTMs (CLoM) beat plain DM, better: {loss.clom: 30.0, pool.source: $SRC}, than: control},
        {claim: 'domain match matters: target domain beats an inverted domain', better: {loss.clom: 30.0, pool.source: $SRC}, than: {pool.source: {name: $DATA, train_per_class: 500, domain: invert}}},
        {claim: 'domain match matters: target domain beats a low-resolution domain', better: {loss.clom: 30.0, pool.source: $SRC}, than: {pool.source: {name: $DATA, train_per_class: 500, domain: lowres}}},
        {claim: PTMs of another label space help through CCLoM, better: {pool.source: {name: $DATA, train_per_class: 1000, classes: [0, 1, 2, 3, 4]}}, than: control}]") ;;
    loss_weights|loss_weights_ipc1)  # the claims' points, alpha 0/30 x beta 0/1 (the alpha curve: loss_weights_alpha)
      extra=(--set "base.pool.source=$SRC" --set name=$s
             --set "sweep={loss.clom: {grid: [0.0, 30.0]}, loss.cclom: {grid: [0.0, 1.0]}}")
      [[ $s == *_ipc1 ]] && extra+=(--set base.distill.ipc=1) ;;
    loss_weights_alpha)  # the CLoM weight curve, beta 0: alpha 0, 10, 30, 100, 1000
      extra=(--set "base.pool.source=$SRC" --set name=$s --set "sweep={loss.clom: {grid: [0.0, 10.0, 30.0, 100.0, 1000.0]}}"
             --set matrix=null --set "control={loss.clom: 0.0}" --set "claims=[{claim: CLoM at the alpha best on validation beats plain DM, better: {loss.clom: best}, than: control},
             {claim: CLoM at alpha 10 beats plain DM, better: {loss.clom: 10.0}, than: control},
             {claim: alpha 100 beats alpha 30, better: {loss.clom: 100.0}, than: {loss.clom: 30.0}},
             {claim: alpha 100 beats alpha 1000 (where the PTM term drowns matching), better: {loss.clom: 100.0}, than: {loss.clom: 1000.0}}]") ;;
    loss_weights_beta1)  # the rest of the shipped 5 x 2 grid: alpha 10, 100, 1000 with beta 1
      extra=(--set "base.pool.source=$SRC" --set name=$s --set "sweep={loss.clom: {grid: [10.0, 100.0, 1000.0]}}"
             --set base.loss.cclom=1.0 --set matrix=null --set control=null --set "claims=[]") ;;
    cclom_strength)  # CCLoM at the reference's strength, alone and on CLoM; beta chosen on validation
      extra=(--set "base.pool.source=$SRC" --set name=$s --set base.loss.cclom_batch=8192
             --set "sweep={loss.cclom: {grid: [0.0, 100.0, 1000.0]}}" --set "cases=[{loss.clom: 0.0}, {loss.clom: 30.0}]"
             --set matrix=loss.cclom --set "control={loss.clom: 0.0, loss.cclom: 0.0}"
             --set "claims=[{claim: CCLoM at the beta best on validation beats plain DM, better: {loss.clom: 0.0, loss.cclom: best}, than: control},
             {claim: CCLoM at the beta best on validation adds to CLoM, better: {loss.clom: 30.0, loss.cclom: best}, than: {loss.clom: 30.0, loss.cclom: 0.0}},
             {claim: CCLoM at beta 1000 beats plain DM, better: {loss.clom: 0.0, loss.cclom: 1000.0}, than: control},
             {claim: CLoM beats plain DM, better: {loss.clom: 30.0, loss.cclom: 0.0}, than: control}]") ;;
    disjoint)  # a disjoint label space: PTMs of classes 0-4 guide a target of classes 5-9 through CCLoM
      extra=(--set name=$s --set "base.dataset.classes=[5, 6, 7, 8, 9]"
             --set "base.pool.source={name: $DATA, train_per_class: 1000, classes: [0, 1, 2, 3, 4]}"
             --set base.loss.clom=0.0 --set base.loss.cclom_batch=2048
             --set "sweep={loss.cclom: {grid: [0.0, 10.0, 100.0, 1000.0]}}" --set matrix=null
             --set "control={loss.cclom: 0.0}"
             --set "claims=[{claim: PTMs of a disjoint label space help through CCLoM (beta best on validation), better: {loss.cclom: best}, than: control},
             {claim: CCLoM at beta 1000 from a disjoint label space beats plain DM, better: {loss.cclom: 1000.0}, than: control}]") ;;
    compiled)  # issue 14's accuracy check: plain DM and DM + CLoM (alpha 100) through torch.compile, the same
      # seeds as loss_weights_alpha (pair them: bench/compare_studies.py compiled loss_weights_alpha)
      extra=(--set "base.pool.source=$SRC" --set name=$s --set base.distill.compile=true
             --set "sweep={loss.clom: {grid: [0.0, 100.0]}}" --set matrix=null --set control=null --set "claims=[]") ;;
    compiled_seeds|eager_seeds)  # plain DM at seeds 3-5, through torch.compile or eager, to grow the compiled
      # check's n (bench/compare_studies.py compiled,compiled_seeds loss_weights_alpha,eager_seeds)
      c=false; [ "$s" = compiled_seeds ] && c=true
      extra=(--set "base.pool.source=$SRC" --set name=$s --set base.distill.compile=$c --set base.seed=3
             --set "sweep={loss.clom: {grid: [0.0]}}" --set matrix=null --set control=null --set "claims=[]") ;;
    overtrained)  # Finding 2 where PTMs fit their data: checkpoints 2..150 of 150-epoch runs on 500 images/class
      extra=(--set "base.pool.source=$SRC" --set name=$s --set base.pretrain.epochs=150 --set base.pool.epoch=150
             --set "base.pretrain.save_epochs=[2, 10, 30, 75, 150]" --set base.loss.clom=$ALPHA
             --set "sweep={pool.epoch: {grid: [2, 10, 30, 75, 150]}}"
             --set "claims=[{claim: the epoch best on validation beats the over-trained PTM (epoch 150), better: {pool.epoch: best}, than: {pool.epoch: 150}},
             {claim: a sub-optimal PTM (epoch 30) beats the over-trained one (epoch 150), better: {pool.epoch: 30}, than: {pool.epoch: 150}},
             {claim: an early PTM (epoch 10) beats the over-trained one (epoch 150), better: {pool.epoch: 10}, than: {pool.epoch: 150}},
             {claim: CLoM with over-trained PTMs beats plain DM, better: {pool.epoch: 150}, than: control}]") ;;
    cross_arch)  # AlexNet/VGG11 cost ~0.8/0.5 s per epoch and ~30 s per test pass on one core: 100 epochs
      # keep the study to ~1 h on 2 cores (ResNet18, ~10 min per model, is left to GPU scale)
      extra=(--set "base.pool.source=$SRC" --set "base.eval.archs=[ConvNetW32, AlexNet, VGG11]"
             --set base.eval.epochs=100) ;;
    *) extra=(--set "base.pool.source=$SRC") ;;
  esac
  file=${s%_ipc1}; file=${file%_alpha}; file=${file%_beta1}  # loss_weights_*: loss_weights.yaml
  case $s in cclom_strength|disjoint|compiled|compiled_seeds|eager_seeds) file=loss_weights ;; overtrained) file=epochs ;; esac
  ${PTMDD:-.venv/bin/ptmdd} study "studies/$file.yaml" "${COMMON[@]}" "${extra[@]}" --results "$OUT/results" --store "$OUT/store" ${RESUME:+--resume} || true
  ${PTMDD:-.venv/bin/ptmdd} report "$s" --results "$OUT/results" --out "$OUT/report/$s"
done
