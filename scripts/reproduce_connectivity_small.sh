#!/usr/bin/env bash
set -e
# Reduced-scale run of the Connectivity Matters grid on the real MNIST test set (8k train / 2k test npz made
# from ../shared/datasets/mnist-t10k by scripts/make_mnist10k_npz.py), 1 seed; results in docs/results/.
PL=${PRUNELAB:-prunelab}
COMMON="experiment=sweep_local name=cm_lenet data=npz data.path=${NPZ:-outputs/mnist10k.npz} data.batch_size=100 model=lenet_300_100 schedule=at_init prune.sparsity=null prune.score_batches=10 pretrain.epochs=15 pretrain.optimizer.lr=0.05 logger=none trainer.enable_progress_bar=false"
$PL -m $COMMON method=random allocation=uniform,erk,igq prune.compression=10,100,1000 prune.target=direct,effective
$PL -m $COMMON method=snip,grasp,synflow allocation=global prune.compression=10,100,1000 prune.target=direct,effective
${PL}-report outputs/multirun/cm_lenet --by method allocation prune.target prune.compression --metrics test_acc compression_direct compression_effective --out outputs/report/cm_lenet
