#!/usr/bin/env bash
# Reduced-scale structured pruning on the real MNIST test set (8k train / 2k test npz made from
# ../shared/datasets/mnist-t10k by scripts/make_mnist10k_npz.py): LeNet-5, criteria taylor_fo / taylor_so /
# l2_norm / random_structured, 50% of the FLOPs removed while fine-tuning (iterative, k=10 every 5 batches;
# taylor_so only one-shot: its exact Hessian diagonal costs one Hessian-vector product per unit and batch)
# and one-shot, 1 seed; then the table. Results: docs/results/taylor_lenet5_mnist10k.md.
set -euo pipefail
pl="${PRUNELAB:-prunelab}"
npz="${NPZ:-outputs/mnist10k.npz}"
[ -f "$npz" ] || python scripts/make_mnist10k_npz.py "$(dirname "$0")/../../shared/datasets/mnist-t10k" "$npz"
common="name=taylor_lenet5 data=npz data.path=$npz data.batch_size=100 model=lenet5_caffe pretrain.epochs=8 pretrain.optimizer.lr=0.05 finetune.epochs=2 ++method.amount=0.5 ++method.target_kind=flops prune.score_batches=8 logger=none trainer.enable_progress_bar=false measure.repeats=20"
$pl -m $common method=taylor_fo,l2_norm,random_structured schedule=iterative_structured schedule.frequency=5 schedule.k=10 schedule.epochs=2
$pl -m $common method=taylor_fo,taylor_so,l2_norm,random_structured schedule=oneshot
python scripts/taylor_table.py outputs/multirun/taylor_lenet5
