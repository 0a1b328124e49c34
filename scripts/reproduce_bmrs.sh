#!/usr/bin/env bash
set -e
# Full-scale BMRS reproduction (Wright, Igel, Selvan, NeurIPS 2024, Table 1 settings + ResNet-50/CIFAR-10):
# every setting of conf/experiment/bmrs_*.yaml x rules (BMRS_N as in the paper and as in the authors' code,
# BMRS_U with p = 8 and 4, SNR) x seeds, then the table with the paper's numbers beside.
# Needs the datasets (downloaded into data/ on first use) and, for ResNet-50, a GPU (add trainer=gpu).
# The None and L2 arms (both L2 protocols: docs/methods/bmrs.md) are in scripts/reproduce_bmrs_fmnist.sh, whose
# SETTINGS takes any of these settings too.
PL=${PRUNELAB:-prunelab}
SEEDS=${SEEDS:-0,1,2}
SETTINGS=${SETTINGS:-mlp_mnist mlp_fashion_mnist mlp_cifar10 lenet5_mnist lenet5_fashion_mnist lenet5_cifar10 resnet50_cifar10}
EXTRA=${EXTRA:-}
DIRS=()
for s in $SETTINGS; do
  $PL -m experiment=bmrs_$s method=bmrs_n,bmrs_u,snr seed=$SEEDS $EXTRA
  $PL -m experiment=bmrs_$s method=bmrs_n method.delta_f_n=paper seed=$SEEDS $EXTRA
  $PL -m experiment=bmrs_$s method=bmrs_u method.p=4 seed=$SEEDS $EXTRA
  DIRS+=(outputs/multirun/bmrs_$s)
done
python scripts/bmrs_table.py "${DIRS[@]}" --out outputs/report/bmrs_table.md
