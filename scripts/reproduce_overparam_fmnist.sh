#!/usr/bin/env bash
# Over-parameterized fine-tuning (Qian et al. 2022) on LeNet-5 (6-16-120-84) / full Fashion-MNIST, on a CPU;
# re-runnable and resuming (finished runs are skipped: each run's folder is named by a hash of its config):
#   RUNS=/work/runs/overparam_fmnist CACHE=/work/runs/lenet5_fmnist_cache scripts/reproduce_overparam_fmnist.sh
# Longer fine-tuning at one ratio (its own RUNS: the table groups by ratio):
#   RUNS=/work/runs/overparam_fmnist_ft5 CACHE=/work/runs/lenet5_fmnist_cache RATIOS=0.9 FT_EPOCHS=5 \
#     scripts/reproduce_overparam_fmnist.sh
# One-shot L2-norm structured pruning at RATIOS of the FLOPs removed, then the same compact network fine-tuned
# with finetune=vanilla / overparam / overparam_spkd (SP-KD on the last stage output, finetune.positions=last,
# as RepDistiller's SP), same epochs and LR schedule; seeds are the outer loop. Overlay: conf/experiment/overparam_lenet5_fashion_mnist.yaml.
# Results: docs/results/overparam_lenet5_fmnist.md (scripts/overparam_table.py).
set -uo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
RUNS="${RUNS:-$here/outputs/overparam_fmnist}"
CACHE="${CACHE:-$RUNS/cache}"          # share with reproduce_taylor_fmnist.sh: same dense models
SEEDS="${SEEDS:-0 1 2}"
RATIOS="${RATIOS:-0.5,0.7,0.9}"
PL="${PRUNELAB:-prunelab}"
PY="${PYTHON:-python}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"
mkdir -p "$RUNS" && cd "$RUNS" || exit 1
common=(experiment=overparam_lenet5_fashion_mnist "paths.cache_dir=$CACHE" "paths.data_dir=$RUNS/data"
        "method.amount=$RATIOS" trainer.enable_progress_bar=false)
[ -n "${DATA_SOURCE:-}" ] && common+=("data.source_dir=$DATA_SOURCE")
[ -n "${FT_EPOCHS:-}" ] && common+=("finetune.epochs=$FT_EPOCHS")  # the overlay's 1 epoch otherwise
failed=0
for seed in $SEEDS; do  # seeds outer: an interrupted grid leaves whole seeds
  $PL -m "${common[@]}" seed="$seed" finetune=vanilla,overparam || { echo "seed $seed FAILED" >&2; failed=1; }
  $PL -m "${common[@]}" seed="$seed" finetune=overparam_spkd finetune.positions=last \
    || { echo "spkd seed $seed FAILED" >&2; failed=1; }
done
$PY "$here/scripts/overparam_table.py" "$RUNS/outputs/multirun/overparam_lenet5_fashion_mnist" \
    --setting lenet5_fmnist > "$RUNS/table.md" || failed=1
exit "$failed"
