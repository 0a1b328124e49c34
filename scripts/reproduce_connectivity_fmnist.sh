#!/usr/bin/env bash
# "Connectivity Matters" (Vysogorets & Kempe, JMLR 2023) grid on LeNet-300-100 / full Fashion-MNIST (60k/10k)
# on a CPU, re-runnable and resuming (each run's folder is named by a hash of its config; finished runs are
# skipped):
#   RUNS=/work/runs/cm_fmnist EPOCHS=3 BATCH=500 scripts/reproduce_connectivity_fmnist.sh [GROUP...]
# (defaults: the overlay's recipe, 60 epochs at batch 100; EPOCHS / BATCH cut it for a shared CPU)
# GROUPs (default: all, in this order): random (uniform / ERK / IGQ quotas), saliency (SNIP, GraSP),
# imp (magnitude after training, one round, lottery-ticket rewinding to epoch 1), synflow, lamp (LAMP after
# training, one round with rewinding, like imp); SynFlow with the paper's code's linearisation and per-round
# count (method.linearize=linear method.count_rule=floor: prunelab/pruning/scorers/synflow.py). Compressions 10..1000 (5 log-spaced points), direct and
# effective targets; seeds are the outer loop so an interrupted grid leaves whole seeds.
# Data: the official Fashion-MNIST files (README "Data"); DATA_SOURCE names a folder holding them.
# Results: docs/results/connectivity_lenet300_fmnist.md (tables + plots made by prunelab-report).
set -uo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
RUNS="${RUNS:-$here/outputs/cm_fmnist}"
EPOCHS="${EPOCHS:-60}"
BATCH="${BATCH:-100}"
SEEDS="${SEEDS:-0 1 2}"
COMPS="${COMPS:-10,31.62,100,316.2,1000}"
PL="${PRUNELAB:-prunelab}"
# one thread per process: on a shared 2-core machine two threads made an epoch 15x slower
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"
all_groups="random saliency imp synflow lamp"
groups=("$@"); [ ${#groups[@]} -gt 0 ] || read -ra groups <<< "$all_groups"
for g in "${groups[@]}"; do  # refuse a wrong group before anything runs
  case " $all_groups " in *" $g "*) ;; *) echo "unknown group '$g'; allowed: $all_groups" >&2; exit 2 ;; esac
done
mkdir -p "$RUNS" && cd "$RUNS" || exit 1
common=(experiment=connectivity_lenet_fashion_mnist name=cm_fmnist "paths.cache_dir=$RUNS/cache"
        "paths.data_dir=$RUNS/data" pretrain.epochs="$EPOCHS" data.batch_size="$BATCH"
        "prune.compression=$COMPS"
        prune.target=direct,effective logger=csv trainer.enable_progress_bar=false)
[ -n "${DATA_SOURCE:-}" ] && common+=("data.source_dir=$DATA_SOURCE")
after_training=(allocation=global schedule=iterative schedule.rounds=1 schedule.rewind_epoch=1)
run_group() {
  case "$1" in
    random)   $PL -m "${common[@]}" seed="$2" method=random allocation=uniform,erk,igq ;;
    saliency) $PL -m "${common[@]}" seed="$2" method=snip,grasp allocation=global ;;
    synflow)  $PL -m "${common[@]}" seed="$2" method=synflow allocation=global \
                method.linearize=linear method.count_rule=floor ;;  # the paper's code (prune_synflow)
    imp)      $PL -m "${common[@]}" seed="$2" method=magnitude "${after_training[@]}" ;;
    lamp)     $PL -m "${common[@]}" seed="$2" method=lamp "${after_training[@]}" ;;
    *) echo "unknown group '$1'; allowed: $all_groups" >&2; return 2 ;;
  esac
}
failed=0
for seed in $SEEDS; do
  for g in "${groups[@]}"; do
    run_group "$g" "$seed" || { echo "group $g seed $seed FAILED" >&2; failed=1; }
  done
done
"${PL_REPORT:-prunelab-report}" "$RUNS/outputs/multirun/cm_fmnist" \
  --by method allocation schedule prune.target prune.compression \
  --metrics test_acc compression_direct compression_effective --out "$RUNS/report"
exit "$failed"
