#!/usr/bin/env bash
# The shared well-trained dev models (../shared/models/dev) cleaned by each method, measured by this engine:
# the efficacy table of docs/results.md. 2,500 clean images (5 % of the shared CIFAR-10, stratified, seed 0);
# ACC and ASR on the 10,000 test images (ASR on the 9,000 whose class is not the target).
# Usage: bash scripts/results-dev.sh [OUT_DIR] [METHOD ...]   (finetune nad fst anp ibau, the default: all five;
# a method may carry sanitize flags after a colon, as auto:--auto-candidates=finetune,fst,nad)
# On 2 idle CPU cores, per model: finetune 1 minute, nad 3, fst 1, anp about 11, ibau about 9. A report already
# in OUT_DIR is kept, so an interrupted run goes on where it stopped. Then: .venv/bin/python scripts/results-table.py
set -euo pipefail
out=${1:-var/results-dev}
shift || true
methods=("${@:-finetune nad fst anp ibau}")
shared=../shared
cifar=$shared/datasets/cifar10
dev=$shared/models/dev
nad=.venv/bin/nad
mkdir -p "$out"
[ -f "$out/clean-5pct.npz" ] || $nad subset "$cifar/train.tar.gz" --fraction 0.05 --seed 0 --out "$out/clean-5pct.npz"

for entry in badnets:1 blend:6 sig:2 patch:8; do
  attack=${entry%%:*} target=${entry##*:}
  common=(--arch wrn-16-1 --num-classes 10 --test-data "$cifar/test.tar.gz" --target-label "$target"
          --trigger "scripts/triggers/dev-$attack.json" --checkpoint "$dev/wrn16_1-dev_$attack.safetensors")
  for method in ${methods[@]}; do
    name=${method%%:*} flags=""
    [[ $method == *:* ]] && flags=${method#*:}
    report="$out/$attack-$name.json"
    [ -f "$report" ] && continue
    $nad sanitize "${common[@]}" --clean-data "$out/clean-5pct.npz" --method "$name" $flags \
      --out "$out/$attack-$name.safetensors" --report "$report"
  done
done
