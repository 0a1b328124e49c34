#!/usr/bin/env bash
# Reduced-scale DLLP vs magnitude pruning on the real MNIST test set (8k train / 2k test npz made from
# ../shared/datasets/mnist-t10k by scripts/make_mnist10k_npz.py), LeNet-300-100, 1 seed, a few minutes on a
# 2-core CPU. Arms at the same prune.sparsity s (fraction of the 400 hidden units for DLLP and l2_norm):
#   dllp       method=dllp (unit gates, 10 particles, 3 epochs of SVGD + W), top units by rho, compact, fine-tune
#   l2_norm    structured magnitude: remove the fraction s of hidden units with the smallest incoming-weight
#              L2 norm (one shot), compact, fine-tune  -- the same structure/cost as DLLP
#   magnitude  unstructured global weight magnitude at weight sparsity s (hidden layers, output layer kept)
# then the table (accuracy, measured parameter sparsity and DLLP's reliability metrics; calibration of every
# final network on the test set with --eval): scripts/dllp_table.py.
set -euo pipefail
PL=${PRUNELAB:-prunelab}
PY=${PYTHON:-python}
NPZ=${NPZ:-outputs/mnist10k.npz}
SP=${SPARSITIES:-0.5,0.7,0.9}
[ -f "$NPZ" ] || $PY scripts/make_mnist10k_npz.py ../shared/datasets/mnist-t10k "$NPZ"
COMMON="name=dllp_small data=npz data.path=$NPZ data.batch_size=100 model=lenet_300_100 pretrain.epochs=15
 pretrain.optimizer.lr=0.05 finetune.epochs=5 logger=none trainer.enable_progress_bar=false measure.latency=false
 prune.exclude_last=true"
$PL -m $COMMON method=dllp schedule=train_prune schedule.epochs=3 method.decision=target prune.sparsity=$SP
$PL -m $COMMON method=magnitude schedule=oneshot prune.sparsity=$SP
for s in ${SP//,/ }; do
  $PL $COMMON method=l2_norm schedule=oneshot method.target_kind=units method.amount=$s \
      hydra.run.dir=outputs/multirun/dllp_small/l2_norm_$s
done
$PY scripts/dllp_table.py outputs/multirun/dllp_small --eval --out outputs/report/dllp_small.md
