#!/usr/bin/env bash
# The embedded demo: ℓ1 gradient regularization makes on-the-fly quantization
# robust, shown on scikit-learn's digits (real data, nothing to download).
#
#   bash scripts/demo.sh            # about 4 minutes on 2 CPU cores
#
# For each seed: train a base model, then fine-tune it for the same number of
# steps with no regularization, ℓ1 (two λ), ℓ2, Defensive Quantization and STE
# quantization-aware training (two schemes: "folded", which trains on what
# post-training quantization evaluates, and the earlier "unfolded"); then
# quantize every fine-tuned model after training at a sweep of bit-widths and
# print mean ± std over seeds, grouped by method, in the paper's table layout. Every command is printed before it
# runs: they are the commands to use on your own runs.
#
# Everything goes to $DEMO_OUT (default demo_out/): runs/ (checkpoints),
# ptq.md, ptq.json, ptq.csv, ptq.png (the table, the raw numbers, the plot).
# Rerunning skips finished runs (train.py resumes; a finished run is a no-op).
#
# Knobs (environment variables; the defaults are the tuned demo):
#   DEMO_SEEDS=3        number of seeds (0 .. N-1)
#   DEMO_EPOCHS=15      base training epochs
#   DEMO_FT_EPOCHS=10   fine-tuning epochs (the same for every method)
#   DEMO_WIDTH=32       DigitsCNN width
#   DEMO_BITS=...       the (W,A) sweep, as eval_ptq.py --bits
#   DEMO_OUT=demo_out   output folder
#   PYTHON=python3      the interpreter (the activated virtualenv's by default)
set -euo pipefail

cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
OUT=${DEMO_OUT:-demo_out}
SEEDS=${DEMO_SEEDS:-3}
EPOCHS=${DEMO_EPOCHS:-15}
FT_EPOCHS=${DEMO_FT_EPOCHS:-10}
WIDTH=${DEMO_WIDTH:-32}
BITS=${DEMO_BITS:-8:8,4:4,4:3,3:8,3:3,8:2,4:2,3:2}

# The tuned recipe (see README "The demo"): fine-tune with SGD at a small
# learning rate; λ from the paper's rule, the largest that keeps float accuracy.
FT_LR=0.01
L1_SMALL=0.02   # the largest λ that keeps float accuracy (paper §4.1)
L1_LARGE=0.05   # 2.5× larger: past the (narrow) useful window
L2_COEF=5       # the same rule; ‖∇‖₂ is ~100× smaller than ‖∇‖₁
DQ_BETA=0.01    # the best of 0.001, 0.01, 0.1 at low bits
STE_BITS=3:2    # the harshest pair of the sweep

# Compiled XLA programs are cached across the runs (and across reruns): every
# seed's runs compile the same programs.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$OUT/jax_cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-0}

if ! [[ $SEEDS =~ ^[1-9][0-9]*$ ]]; then
  echo "error: DEMO_SEEDS must be a positive integer, got '$SEEDS'." >&2
  exit 2
fi

start=$SECONDS
step=0
total=$(( SEEDS * 8 + 1 ))

# Prints a progress header and the command, then runs it.
run() {
  step=$(( step + 1 ))
  local elapsed=$(( SECONDS - start ))
  printf '\n[%d/%d, %dm%02ds] %s\n' "$step" "$total" $(( elapsed / 60 )) $(( elapsed % 60 )) "$1"
  shift
  echo "+ $*"
  "$@"
}

CONFIG=(--config configs/digits.py --config.model_kwargs.width="$WIDTH")
workdirs=()

# Fine-tunes $base (seed $seed): the same start, steps and learning-rate
# schedule for every method; only the regularization differs.
finetune() {
  local name=$1 what=$2
  shift 2
  run "seed $seed: fine-tune, $what" \
    "$PYTHON" train.py "${CONFIG[@]}" --workdir "$OUT/runs/${name}_s$seed" \
      --config.seed="$seed" --config.init_from="$base" \
      --config.num_epochs="$FT_EPOCHS" --config.learning_rate="$FT_LR" "$@"
  workdirs+=(--workdir "$OUT/runs/${name}_s$seed")
}

for (( seed = 0; seed < SEEDS; seed++ )); do
  base=$OUT/runs/base_s$seed
  run "seed $seed: base model, $EPOCHS epochs" \
    "$PYTHON" train.py "${CONFIG[@]}" --workdir "$base" \
      --config.seed="$seed" --config.num_epochs="$EPOCHS"
  finetune none "no regularization"
  finetune l1_small "ℓ1 gradient penalty, λ=$L1_SMALL" \
    --config.reg.kind=l1 --config.reg.weight_coef="$L1_SMALL"
  finetune l1_large "ℓ1 gradient penalty, larger λ=$L1_LARGE" \
    --config.reg.kind=l1 --config.reg.weight_coef="$L1_LARGE"
  finetune l2 "ℓ2 gradient penalty, λ=$L2_COEF" \
    --config.reg.kind=l2 --config.reg.weight_coef="$L2_COEF"
  finetune dq "Defensive Quantization, β=$DQ_BETA" \
    --config.reg.kind=dq --config.reg.weight_coef="$DQ_BETA"
  finetune ste "STE quantization-aware training at (W,A)=(${STE_BITS/:/,}), BN folded, DFQ ranges" \
    --config.qat.bits="$STE_BITS"
  finetune ste_unfolded "STE at (W,A)=(${STE_BITS/:/,}), the unfolded scheme (BN in float, batch min/max ranges)" \
    --config.qat.bits="$STE_BITS" --config.qat.scheme=unfolded
done

run "post-training quantization of all $(( ${#workdirs[@]} / 2 )) fine-tuned runs at $BITS" \
  "$PYTHON" eval_ptq.py "${workdirs[@]}" --bits "$BITS" --group_by method --out "$OUT"

elapsed=$(( SECONDS - start ))
echo
printf '=== Demo done in %dm%02ds. Post-training quantization, top-1 %% on the 360 test digits, mean ± std over %d seed(s):\n' \
  $(( elapsed / 60 )) $(( elapsed % 60 )) "$SEEDS"
echo
# The grouped table: the first table of the report.
awk '/^\|/ {print; seen=1; next} seen {exit}' "$OUT/ptq.md"
echo
echo "(W,A) = (weight bits, activation bits); FP = float. Weights per tensor with batch norm folded"
echo "into them; activation ranges from batch norm (Data-Free Quantization rule); nothing calibrated."
echo
echo "Report: $OUT/ptq.md (with KL and per-run tables), $OUT/ptq.json, $OUT/ptq.csv; plot: $OUT/ptq.png"
