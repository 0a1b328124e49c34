#!/usr/bin/env bash
set -e
# Full-scale reproduction of Qian et al. 2022 (arXiv 2204.11444): vanilla fine-tuning vs linear
# over-parameterization vs over-parameterization + SP-KD of the same structurally pruned (L2-norm, one-shot,
# compacted) network, for ResNet-56 and VGG-19 on CIFAR-10 and ResNet-50 on ImageNet, each at 3 FLOPs
# pruning ratios (conf/experiment/overparam_*.yaml: the sweep is in each overlay's hydra.sweeper.params).
#   bash scripts/reproduce_overparam.sh                      # CIFAR-10 settings
#   RESNET50_WEIGHTS=/path/resnet50-19c8e357.pth IMAGENET=1 bash scripts/reproduce_overparam.sh
# Extra Hydra overrides for every run: OVERRIDES="trainer=gpu seed=0,1,2".
PL=${PRUNELAB:-prunelab}
PY=${PYTHON:-python}
OVERRIDES=${OVERRIDES:-"trainer=gpu"}
$PL -m experiment=overparam_resnet56_cifar10 $OVERRIDES
$PL -m experiment=overparam_vgg19_cifar10 $OVERRIDES
DIRS="outputs/multirun/overparam_resnet56_cifar10 outputs/multirun/overparam_vgg19_cifar10"
if [ -n "${IMAGENET:-}" ]; then
  $PL -m experiment=overparam_resnet50_imagenet model.weights="${RESNET50_WEIGHTS:?set RESNET50_WEIGHTS}" $OVERRIDES
  DIRS="$DIRS outputs/multirun/overparam_resnet50_imagenet"
fi
mkdir -p outputs/report
$PY scripts/overparam_table.py $DIRS --out outputs/report/overparam.md
