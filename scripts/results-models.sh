#!/usr/bin/env bash
# Well-trained backdoored models cleaned by each method, measured by this engine: the efficacy tables of
# docs/results.md. The models: the shared dev models ($SHARED/models/dev, SHARED defaulting to ../shared) and
# ours from scripts/attack-own.sh (in $OWN, default var/own), each with its trigger in
# scripts/triggers/<model>.json and its architecture in scripts/models.sh. 2,500 clean images (5 % of
# the shared CIFAR-10, stratified, seed 0); ACC and ASR on the 10,000 test images (ASR on the 9,000 whose class
# is not the target).
# Usage: [MODELS="dev-badnets own-warp"] bash scripts/results-models.sh [OUT_DIR] [METHOD ...]
#   MODELS defaults to every model of scripts/models.sh whose checkpoint is present; METHOD defaults to
#   finetune, nad with the authors' defaults ("nad:--nad-sam-rho=0 --no-nad-refit-bias": plain SGD, no bias refit),
#   fst, anp, ibau, sau and auto (whose report's `auto.candidates` has the engine's default nad as measured there).
#   A METHOD may carry sanitize flags after a colon, as auto:--auto-candidates=nad,fst (quote a METHOD with several
#   flags: "auto:--auto-candidates=nad,ibau --ibau-lr=0.0003"); its report is named by the method alone.
# On 2 idle CPU cores, per model: finetune 1 minute, nad 3, fst 1, anp about 11, ibau about 7, sau about 5 (9 on
# one thread), auto (nad, sau, fst) about 9. A report already in OUT_DIR is kept, so an interrupted run goes on
# where it stopped. It runs from the repository root: a relative OUT_DIR, SHARED or OWN is taken from there. Then:
# .venv/bin/python scripts/results-table.py
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/models.sh
out=${1:-var/results}
shift || true
methods=("$@")
(($#)) || methods=(finetune "nad:--nad-sam-rho=0 --no-nad-refit-bias" fst anp ibau sau auto)
cifar=${SHARED:-../shared}/datasets/cifar10
declare -A folder=([dev]=${SHARED:-../shared}/models/dev [own]=${OWN:-var/own})
nad=.venv/bin/nad
mkdir -p "$out"
[ -f "$out/clean-5pct.npz" ] || $nad subset "$cifar/train.tar.gz" --fraction 0.05 --seed 0 --out "$out/clean-5pct.npz"

for model in ${MODELS:-${!target[@]}}; do
  [ -n "${target[$model]:-}" ] || { echo "unknown model $model: scripts/models.sh lists them" >&2; exit 2; }
  checkpoint="${folder[${model%%-*}]}/$(checkpoint_of "$model")"
  if [ ! -f "$checkpoint" ]; then echo "skipping $model: no $checkpoint" >&2; continue; fi
  # The dev triggers' pattern files live in ../shared: where SHARED says, inline
  trigger=$(sed "s#\.\./shared/#${SHARED:-../shared}/#" "scripts/triggers/$model.json")
  common=(--arch "$(arch_of "$model")" --num-classes 10 --test-data "$cifar/test.tar.gz"
          --target-label "${target[$model]}" --trigger "$trigger" --checkpoint "$checkpoint")
  for method in "${methods[@]}"; do
    name=${method%%:*} flags=""
    [[ $method == *:* ]] && flags=${method#*:}
    report="$out/$model-$name.json"
    [ -f "$report" ] && continue
    $nad sanitize "${common[@]}" --clean-data "$out/clean-5pct.npz" --method "$name" $flags \
      --out "$out/$model-$name.safetensors" --report "$report"
  done
done
