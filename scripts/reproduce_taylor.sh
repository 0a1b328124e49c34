#!/usr/bin/env bash
# Molchanov et al. (CVPR 2019), Table 3: ResNet-50 on ImageNet, Taylor-FO-BN at 72 / 81 / 91% kept gates,
# from the torchvision pretrained weights (download resnet50-19c8e357.pth yourself; ImageNet under data/imagenet):
#   scripts/reproduce_taylor.sh /path/to/resnet50-19c8e357.pth [extra Hydra overrides, e.g. SLURM launcher]
# then the table beside the paper's numbers.
set -euo pipefail
weights="$1"; shift
pl="${PRUNELAB:-prunelab}"
$pl -m experiment=taylor_resnet50_imagenet model.weights="$weights" method.amount=0.28,0.19,0.09 "$@"
python scripts/taylor_table.py outputs/multirun/taylor_resnet50_imagenet
