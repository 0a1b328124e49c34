#!/usr/bin/env bash
# Taylor importance (Molchanov et al., CVPR 2019) on LeNet-5 (6-16-120-84) / full Fashion-MNIST, on a CPU;
# re-runnable and resuming (finished runs are skipped: each run's folder is named by a hash of its config):
#   RUNS=/work/runs/taylor_fmnist CACHE=/work/runs/lenet5_fmnist_cache scripts/reproduce_taylor_fmnist.sh
# 1. accuracy vs parameters removed: criteria taylor_fo / taylor_so / l2_norm / random_structured, one-shot
#    (scores from 8 batches of the dense model), AMOUNTS of the parameters removed, compacted, fine-tuned;
#    seeds are the outer loop (an interrupted grid leaves whole seeds);
# 2. the oracle correlation table on real data (scripts/oracle_correlation_fmnist.py, on the same cached
#    dense models). Overlay: conf/experiment/taylor_lenet5_fashion_mnist.yaml.
# Results: docs/results/taylor_lenet5_fmnist.md.
set -uo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
RUNS="${RUNS:-$here/outputs/taylor_fmnist}"
CACHE="${CACHE:-$RUNS/cache}"          # share with reproduce_overparam_fmnist.sh: same dense models
SEEDS="${SEEDS:-0 1 2}"
AMOUNTS="${AMOUNTS:-0.25,0.5,0.75,0.9}"
PL="${PRUNELAB:-prunelab}"
PY="${PYTHON:-python}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"
mkdir -p "$RUNS" && cd "$RUNS" || exit 1
common=(experiment=taylor_lenet5_fashion_mnist "paths.cache_dir=$CACHE" "paths.data_dir=$RUNS/data"
        trainer.enable_progress_bar=false)
[ -n "${DATA_SOURCE:-}" ] && common+=("data.source_dir=$DATA_SOURCE")
failed=0
for seed in $SEEDS; do
  $PL -m "${common[@]}" seed="$seed" method=taylor_fo,taylor_so,l2_norm,random_structured \
      "method.amount=$AMOUNTS" || { echo "seed $seed FAILED" >&2; failed=1; }
done
# shellcheck disable=SC2086
$PY "$here/scripts/oracle_correlation_fmnist.py" --seeds $SEEDS --cache "$CACHE" --data-dir "$RUNS/data" \
    --out "$RUNS/oracle.md" || failed=1
$PY "$here/scripts/taylor_table.py" "$RUNS/outputs/multirun/taylor_lenet5_fashion_mnist" > "$RUNS/table.md" || failed=1
exit "$failed"
