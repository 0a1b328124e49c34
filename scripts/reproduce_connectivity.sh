#!/usr/bin/env bash
# Reproduce the grid of "Connectivity Matters" (Vysogorets & Kempe, JMLR 2023) for one network:
#   scripts/reproduce_connectivity.sh [lenet_mnist|vgg19_cifar100|resnet18_tiny] [extra Hydra overrides...]
# Pruning at init (random with uniform / ERK / IGQ quotas, SNIP, GraSP, SynFlow as the paper's code computes
# it: method=synflow_cm) and magnitude after training with lottery-ticket rewinding, compressions 10..1000
# (log-spaced), direct and effective targets, 3 seeds; then the report: effective vs direct compression per
# method, accuracy vs effective compression.
# Runs locally with the joblib launcher (experiment overlays add hydra/launcher=submitit_slurm for SLURM).
set -euo pipefail
net="${1:-lenet_mnist}"; shift || true
exp="connectivity_${net}"
comps="10,21.5,46.4,100,215,464,1000"
seeds="0,1,2"
pl="${PRUNELAB:-prunelab}"
$pl -m experiment="$exp" method=random allocation=uniform,erk,igq \
    prune.compression=$comps prune.target=direct,effective seed=$seeds hydra/launcher=joblib "$@"
$pl -m experiment="$exp" method=snip,grasp,synflow_cm allocation=global \
    prune.compression=$comps prune.target=direct,effective seed=$seeds hydra/launcher=joblib "$@"
$pl -m experiment="$exp" method=magnitude allocation=global schedule=iterative schedule.rounds=1 \
    schedule.rewind_epoch=1 finetune.epochs='${pretrain.epochs}' \
    prune.compression=$comps prune.target=direct,effective seed=$seeds hydra/launcher=joblib "$@"
"${PL_REPORT:-prunelab-report}" "outputs/multirun/$exp" --by method allocation schedule prune.target prune.compression \
    --out "outputs/report/$exp"
