#!/usr/bin/env bash
# BMRS Table 1, Fashion-MNIST columns (Wright, Igel, Selvan, NeurIPS 2024) on the full official Fashion-MNIST
# (60k/10k; data.source_dir=auto finds the Debian package's copy, md5-checked), on a CPU; re-runnable and
# resuming (finished runs are skipped: each run's folder is named by a hash of its config):
#   RUNS=/work/runs/bmrs_fmnist SETTINGS="mlp_fashion_mnist" SEEDS="0 1 2" scripts/reproduce_bmrs_fmnist.sh
# Per setting (conf/experiment/bmrs_<setting>.yaml: the paper's App. C settings) and seed (outer loop, so an
# interrupted grid leaves whole seeds), the arms of Table 1, in the order ARMS gives (default below), one
# invocation each:
#   bmrs_n, bmrs_u (p=8), bmrs_u (p=4), snr, expected_theta: 50 epochs with the noise + 10 of fine-tuning;
#       bmrs_n before l2*, and bmrs_n_zeroed before l2_noisy_epochs, which read their fractions;
#   l2: the same network trained without noise for 50 epochs (the overlay's recipe), then one-shot L2-norm unit
#       pruning at the fraction of units that BMRS_N removed with that seed, compacted, 10 epochs of fine-tuning
#       keeping the best-validation epoch (as the paper's L2 column);
#   l2_params: the same, at the fraction of the parameters that BMRS_N removed (of the folded, compacted
#       network); for the 1-hidden-layer MLP the two fractions coincide, for LeNet-5 they do not;
#   l2_noisy: the authors' L2 baseline (method=bmrs_l2): trained 50 epochs with the same noise and KL as the
#       BMRS arms, then the units with the smallest incoming-weight L2 norms, over the whole network, at BMRS_N's
#       unit fraction of that seed, then the same 10 epochs of fine-tuning;
#   bmrs_n_zeroed: BMRS_N as the authors' code runs it with its default --compress_epochs 1: the weights of
#       the units cut after an epoch are zeroed in place (method.zero_pruned=true), so a unit that comes back
#       restarts from zero;
#   l2_noisy_epochs: l2_noisy as their code runs it with that default: also every unit with incoming norm
#       <= 0.5 cut and zeroed after every epoch (method.l2_epoch_threshold=0.5 method.zero_pruned=true), at the
#       unit fraction of bmrs_n_zeroed of that seed (their L2 reads a BMRS_N metrics file made with the same
#       defaults); the other L2 arms read bmrs_n, never a zeroed run;
#   none: l2's dense network (the same cached 50 epochs), nothing pruned (sparsity 0), the same 10 epochs of
#       fine-tuning keeping the best-validation epoch: 50 + 10 epochs like every other arm.
# Table: python scripts/bmrs_table.py $RUNS/outputs/multirun [--csv runs.csv]  (docs/results/bmrs_fmnist.md).
set -uo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
RUNS="${RUNS:-$here/outputs/bmrs_fmnist}"
SETTINGS="${SETTINGS:-mlp_fashion_mnist lenet5_fashion_mnist}"
SEEDS="${SEEDS:-0 1 2}"
ALL_ARMS="bmrs_n l2 l2_params l2_noisy bmrs_n_zeroed l2_noisy_epochs none bmrs_u8 bmrs_u4 snr expected_theta"
ARMS="${ARMS:-$ALL_ARMS}"
PL="${PRUNELAB:-prunelab}"
PY="${PYTHON:-python}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"
for arm in $ARMS; do  # refuse a wrong arm before anything runs
  case " $ALL_ARMS " in *" $arm "*) ;; *) echo "ARMS: unknown arm '$arm'; allowed: $ALL_ARMS" >&2; exit 2 ;; esac
done
mkdir -p "$RUNS" && cd "$RUNS" || exit 1
failed=0
for setting in $SETTINGS; do
  common=(experiment=bmrs_$setting "paths.cache_dir=$RUNS/cache" "paths.data_dir=$RUNS/data"
          trainer.enable_progress_bar=false logger=csv)
  [ -n "${DATA_SOURCE:-}" ] && common+=("data.source_dir=$DATA_SOURCE")
  for seed in $SEEDS; do
    for arm in $ARMS; do
      case "$arm" in
        bmrs_n|snr|expected_theta) $PL -m "${common[@]}" seed="$seed" method="$arm" || failed=1 ;;
        bmrs_n_zeroed) $PL -m "${common[@]}" seed="$seed" method=bmrs_n method.zero_pruned=true || failed=1 ;;
        bmrs_u8) $PL -m "${common[@]}" seed="$seed" method=bmrs_u method.p=8 || failed=1 ;;
        bmrs_u4) $PL -m "${common[@]}" seed="$seed" method=bmrs_u method.p=4 || failed=1 ;;
        none) $PL -m "${common[@]}" seed="$seed" schedule=oneshot "~schedule.epochs" method=random \
                  allocation=uniform prune.sparsity=0 name="bmrs_${setting}_none" || failed=1 ;;
        l2|l2_params|l2_noisy|l2_noisy_epochs)
            kind=units; name="bmrs_${setting}_l2"
            [ "$arm" = l2_params ] && { kind=params; name="bmrs_${setting}_l2p"; }
            zeroed=false; source=bmrs_n
            [ "$arm" = l2_noisy_epochs ] && { zeroed=true; source=bmrs_n_zeroed; }
            frac=$($PY - "$RUNS/outputs/multirun/bmrs_$setting" "$seed" "$kind" "$zeroed" <<'PY'
import json, sys
from pathlib import Path
def removed(f):  # BMRS_N's fraction of units, or of the plain (folded, compacted) network's parameters
    return f["frac_units_removed"] if sys.argv[3] == "units" else 1 - f["params_after"] / f["params_before"]
# newest last: a seed's BMRS_N run re-run under a new folder is read as bmrs_table.py keeps it; a zeroing run
# (method.zero_pruned=true) is read only for the zeroing L2 arm, and only such a run is read for it
fracs = [removed(r["final"]) for p in sorted(Path(sys.argv[1]).rglob("results.json"), key=lambda p: p.stat().st_mtime)
         if (r := json.loads(p.read_text()))["config"]["seed"] == int(sys.argv[2])
         and r["final"].get("rule") == "bmrs_n" and r["final"].get("delta_f_n_variant") == "code"
         and bool(r["config"]["method"].get("zero_pruned", False)) == (sys.argv[4] == "true")]
print(f"{fracs[-1]:.4f}" if fracs else "")
PY
)
            if [ -n "$frac" ] && [ "$arm" = l2_noisy ]; then
              $PL -m "${common[@]}" seed="$seed" method=bmrs_l2 "method.amount=$frac" || failed=1
            elif [ -n "$frac" ] && [ "$arm" = l2_noisy_epochs ]; then
              $PL -m "${common[@]}" seed="$seed" method=bmrs_l2 "method.amount=$frac" \
                  method.l2_epoch_threshold=0.5 method.zero_pruned=true || failed=1
            elif [ -n "$frac" ]; then
              $PL -m "${common[@]}" seed="$seed" method=l2_norm schedule=oneshot "~schedule.epochs" \
                  method.target_kind="$kind" "method.amount=$frac" name="$name" || failed=1
            else
              echo "seed $seed: no $source result (run the $source arm first), $arm arm skipped" >&2; failed=1
            fi ;;
      esac
    done
  done
done
exit "$failed"
