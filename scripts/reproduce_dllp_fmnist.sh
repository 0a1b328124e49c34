#!/usr/bin/env bash
# DLLP vs L2-norm and Taylor unit pruning at equal unit sparsity on LeNet-300-100 / full Fashion-MNIST
# (issue #14, run 5; conf/experiment/dllp_lenet300_fashion_mnist.yaml), re-runnable and resuming:
#   RUNS=/work/runs/dllp_fmnist SEEDS="0 1 2" SPARSITIES="0.5,0.7,0.9" scripts/reproduce_dllp_fmnist.sh
# Per seed (outer loop, so an interrupted grid leaves whole seeds), from the seed's cached dense model:
#   dllp      SVGD on unit gates (3 epochs, weights frozen, taylor prior), top units by rho, compact, fine-tune
#   l2_norm   one shot: the fraction s of hidden units with the smallest incoming-weight L2 norm, compact, fine-tune
#   taylor_fo one shot: first-order Taylor importance of each unit's gate (Molchanov et al.), compact, fine-tune
# Table (accuracy before/after fine-tuning; NLL, Brier, ECE of every deployed network on the test set; DLLP's
# particle-ensemble metrics): python scripts/dllp_table.py $RUNS/outputs/multirun --eval
set -uo pipefail
RUNS="${RUNS:-$(pwd)/outputs/dllp_fmnist}"
SEEDS="${SEEDS:-0 1 2}"
SP="${SPARSITIES:-0.5,0.7,0.9}"
PL="${PRUNELAB:-prunelab}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"
mkdir -p "$RUNS" && cd "$RUNS" || exit 1
paths=("paths.cache_dir=$RUNS/cache" "paths.data_dir=$RUNS/data" trainer.enable_progress_bar=false)
[ -n "${DATA_SOURCE:-}" ] && paths+=("data.source_dir=$DATA_SOURCE")
common=(experiment=dllp_lenet300_fashion_mnist "${paths[@]}")
base=(experiment=dllp_lenet300_fashion_mnist_units "${paths[@]}")
failed=0
for seed in $SEEDS; do
  $PL -m "${common[@]}" seed="$seed" prune.sparsity="$SP" || failed=1
  for s in ${SP//,/ }; do
    $PL -m "${base[@]}" seed="$seed" method=l2_norm,taylor_fo "method.amount=$s" || failed=1
  done
done
exit "$failed"
