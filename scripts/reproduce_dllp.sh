#!/usr/bin/env bash
# Full-scale DLLP vs magnitude pruning (docs/methods/dllp.md): one setting per call,
#   scripts/reproduce_dllp.sh [vgg19_cifar10|resnet18_cifar10|resnet56_cifar10|resnet50_imagenet] [overrides...]
# Both arms (conf/experiment/dllp_<setting>.yaml and dllp_<setting>_magnitude.yaml) in ONE multirun over the
# sparsities and 3 seeds; they share the cached dense model. Then the table (accuracy, parameter sparsity,
# reliability; --eval measures NLL/Brier/ECE of every final network on the test set).
# Local joblib launcher by default; on SLURM add hydra/launcher=submitit_slurm (see conf/experiment/slurm.yaml).
set -euo pipefail
setting="${1:-resnet56_cifar10}"; shift || true
exp="dllp_${setting}"
case "$setting" in
  resnet50_imagenet) sp="0.3,0.5" ;;
  *) sp="0.3,0.5,0.7" ;;
esac
pl="${PRUNELAB:-prunelab}"
$pl -m experiment="$exp","${exp}_magnitude" prune.sparsity=$sp seed=0,1,2 hydra/launcher=joblib "$@"
${PYTHON:-python} scripts/dllp_table.py "outputs/multirun/$exp" --eval --out "outputs/report/$exp.md"
