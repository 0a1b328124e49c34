#!/usr/bin/env bash
set -e
# Reduced-scale BMRS run on the real MNIST test set (8k train / 2k test npz made from
# ../shared/datasets/mnist-t10k by scripts/make_mnist10k_npz.py; 80/20 train/validation split of the 8k):
# the paper's MNIST MLP (7 hidden layers of 100), Adam lr 1e-3 without weight decay, batch 64,
# EPOCHS (10) epochs of training with continuous pruning + FT_EPOCHS (3) of fine-tuning (best validation epoch),
# one seed; rules bmrs_n (the code's Delta F_N and the paper's Eq. 8), bmrs_u (p = 8, 4), snr, expected_theta, and a dense baseline
# (same recipe, no noise). A few minutes on a 2-core CPU. Table: docs/methods/bmrs.md.
# Scale deviation: 1,000 steps instead of the paper's ~37,500; Adam moves a parameter by at most ~lr per step,
# so at lr 1e-3 the noise parameters (mu starts at 0, pruning needs mu << 0) cannot reach the pruned region
# (measured: nothing pruned by any rule). The noise parameters get NOISE_LR (3e-2) here (method.noise_lr).
PL=${PRUNELAB:-prunelab}
NPZ=${NPZ:-outputs/mnist10k.npz}
[ -f "$NPZ" ] || python scripts/make_mnist10k_npz.py ../shared/datasets/mnist-t10k "$NPZ"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # tiny layers: one thread per run is fastest
E=${EPOCHS:-10}; F=${FT_EPOCHS:-3}
BASE="experiment=bmrs_mlp_mnist name=bmrs_small data=npz data.path=$NPZ finetune.epochs=$F logger=none trainer.enable_progress_bar=false measure.latency=false"
COMMON="$BASE schedule.epochs=$E pretrain.epochs=$E method.noise_lr=${NOISE_LR:-3.0e-2}"
$PL -m $COMMON method=bmrs_n,bmrs_u,snr,expected_theta
$PL -m $COMMON method=bmrs_n method.delta_f_n=paper
$PL -m $COMMON method=bmrs_u method.p=4
# dense baseline: the same network and recipe trained without noise (E + F epochs, best validation epoch)
$PL -m $BASE schedule=at_init ~schedule.epochs method=random allocation=uniform prune.sparsity=0 pretrain.epochs=$((E + F))
python scripts/bmrs_table.py outputs/multirun/bmrs_small --out outputs/report/bmrs_small.md
