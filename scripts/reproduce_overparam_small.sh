#!/usr/bin/env bash
set -e
# Reduced-scale check of Qian et al. 2022 (linear over-parameterization + SP-KD for fine-tuning pruned nets)
# on a 2-core CPU: LeNet-5 on the real MNIST test set (8k train / 2k test npz made from
# ../shared/datasets/mnist-t10k by scripts/make_mnist10k_npz.py). Dense model pretrained once (cached), then
# structured L2-norm filter/neuron pruning (one-shot, channels physically removed, fraction of FLOPs removed
# = method.amount), then a short fine-tuning with finetune=vanilla / overparam / overparam_spkd (same epochs,
# optimiser and LR schedule). Table: scripts/overparam_table.py (written to outputs/report/overparam_small.md).
PL=${PRUNELAB:-prunelab}
PY=${PYTHON:-python}
NPZ=${NPZ:-outputs/mnist10k.npz}
[ -f "$NPZ" ] || $PY scripts/make_mnist10k_npz.py ../shared/datasets/mnist-t10k "$NPZ"
RATIOS=${RATIOS:-0.7,0.9}
SEEDS=${SEEDS:-0}
FT_EPOCHS=${FT_EPOCHS:-2}
$PL -m name=overparam_small data=npz data.path="$NPZ" data.batch_size=100 model=lenet5_caffe \
  method=l2_norm method.target_kind=flops schedule=oneshot \
  pretrain.epochs=8 "pretrain.optimizer={name: sgd, lr: 0.05, momentum: 0.9, weight_decay: 5.0e-4}" \
  finetune=vanilla,overparam,overparam_spkd finetune.epochs="$FT_EPOCHS" \
  "finetune.optimizer={name: sgd, lr: 0.01, momentum: 0.9, weight_decay: 5.0e-4}" \
  method.amount="$RATIOS" seed="$SEEDS" \
  measure.latency=false logger=none trainer.enable_progress_bar=false
mkdir -p outputs/report
$PY scripts/overparam_table.py outputs/multirun/overparam_small --setting lenet5_mnist10k | tee outputs/report/overparam_small.md
# SP-KD variants (only the overparam_spkd arm): stage outputs as in Tung & Mori (LeNet-5: the ReLUs feeding the
# two pools) with the default gamma, and the expanded-block outputs with gamma / 10.
for VARIANT in "finetune.positions=stages finetune.gamma=3000" "finetune.positions=expanded finetune.gamma=300"; do
  $PL -m name=overparam_small_spkd data=npz data.path="$NPZ" data.batch_size=100 model=lenet5_caffe \
    method=l2_norm method.target_kind=flops schedule=oneshot \
    pretrain.epochs=8 "pretrain.optimizer={name: sgd, lr: 0.05, momentum: 0.9, weight_decay: 5.0e-4}" \
    finetune=overparam_spkd finetune.epochs="$FT_EPOCHS" \
    "finetune.optimizer={name: sgd, lr: 0.01, momentum: 0.9, weight_decay: 5.0e-4}" $VARIANT \
    method.amount="$RATIOS" seed="$SEEDS" \
    measure.latency=false logger=none trainer.enable_progress_bar=false
done
$PY scripts/overparam_table.py outputs/multirun/overparam_small outputs/multirun/overparam_small_spkd --by-spkd \
  --setting lenet5_mnist10k | tee outputs/report/overparam_small_spkd.md
