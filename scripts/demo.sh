#!/usr/bin/env bash
# The embedded demo: the paper's whole protocol on scikit-learn's digits
# (real data, nothing to download), as one study (configs/studies/digits.py).
#
#   bash scripts/demo.sh                    # the full study (README: time)
#   bash scripts/demo.sh --config.seeds=0   # any study.py override
#
# For each of 3 seeds: train a base model; on the first seed, choose λ of the
# ℓ1 and ℓ2 penalties by the paper's rule on 360 held-out training images
# (minival); fine-tune every base with no regularization, ℓ1 (exact and
# finite difference), ℓ2, Defensive Quantization and STE quantization-aware
# training (folded, as PTQ evaluates, and the earlier unfolded scheme); then
# quantize every fine-tuned model after training at a sweep of bit-widths on
# the 360 test digits and print mean ± std over seeds per method.
#
# Everything goes to $DEMO_OUT (default demo_out/): runs/ (checkpoints),
# study.md (every table), study.json, study.csv, study.png. Rerunning skips
# finished runs. PYTHON=python3 picks the interpreter (default: the activated
# virtualenv's).
set -euo pipefail

cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
OUT=${DEMO_OUT:-demo_out}

start=$SECONDS
echo "+ $PYTHON study.py --config configs/studies/digits.py --workdir $OUT $*"
"$PYTHON" study.py --config configs/studies/digits.py --workdir "$OUT" "$@"

elapsed=$(( SECONDS - start ))
echo
printf '=== Demo done in %dm%02ds. Post-training quantization, top-1 %% on the 360 test digits:\n' \
  $(( elapsed / 60 )) $(( elapsed % 60 ))
echo
# The study's first table (mean ± std over seeds, one row per method).
awk '/^\|/ {print; seen=1; next} seen {exit}' "$OUT/study.md"
echo
echo "(W,A) = (weight bits, activation bits); FP = float. Weights per tensor with batch norm folded"
echo "into them; activation ranges from batch norm (Data-Free Quantization rule); nothing calibrated."
echo "λ chosen on held-out training images, never on the test digits. All tables: $OUT/study.md"
