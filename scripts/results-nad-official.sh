#!/usr/bin/env bash
# Reproduces docs/results.md: the NAD authors' BadNets WRN-16-1 on the shared CIFAR-10, measured by this engine.
# `nad-own-teacher` and `nad-authors-teacher` are the authors' NAD (plain SGD, no bias refit); `nad` is the engine's
# default NAD (sharpness-aware steps after the lr drop, the bias refit) and `auto` the default method.
# Usage: bash scripts/results-nad-official.sh [OUT_DIR]   (about 15 minutes on 2 idle CPU cores)
# It runs from the repository root: a relative OUT_DIR (default var/results-official) or SHARED is taken from there.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-var/results-official}
shared=${SHARED:-../shared}
cifar=$shared/datasets/cifar10
official=$shared/models/nad-official
nad=.venv/bin/nad
mkdir -p "$out"
common=(--arch wrn-16-1 --num-classes 10 --test-data "$cifar/test.tar.gz" --trigger nad-grid --target-label 5)

[ -f "$out/clean-5pct.npz" ] || $nad subset "$cifar/train.tar.gz" --fraction 0.05 --seed 0 --out "$out/clean-5pct.npz"
for name in backdoored teacher nad-erased; do
  $nad evaluate "${common[@]}" --checkpoint "$official/wrn16_1-badnets-grid-$name.pth.tar" --report "$out/eval-$name.json"
done
run() {  # name, then extra sanitize arguments
  local name=$1; shift
  $nad sanitize "${common[@]}" --checkpoint "$official/wrn16_1-badnets-grid-backdoored.pth.tar" \
    --clean-data "$out/clean-5pct.npz" --out "$out/$name.safetensors" --report "$out/$name.json" "$@"
}
run finetune --method finetune
authors=(--method nad --nad-sam-rho 0 --no-nad-refit-bias)
run nad-own-teacher "${authors[@]}"
run nad-authors-teacher "${authors[@]}" --teacher "$official/wrn16_1-badnets-grid-teacher.pth.tar"
run nad --method nad
run auto --method auto
