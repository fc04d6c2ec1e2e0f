#!/usr/bin/env bash
# Trains this project's own backdoored models with `nad attack` (docs/results.md, "Our own models"): WRN-16-1 on
# all 50,000 shared CIFAR-10 training images, 30 epochs of SGD at lr 0.1 (tenfold down at epochs 15 and 22),
# batch 128, weight decay 5e-4, crop and flip, 10 % of the images poisoned (the clean-label sinusoid: 80 % of the
# target class's images, as for the dev model). Models land in $1 (default var/own), outside the repository; the
# data is read from $SHARED (default ../shared).
# Usage: scripts/attack-own.sh [DIR] [NAME ...], NAME warp, blend, badnets, sig, patch (WRN-16-1; the default is
# these five) or preact-badnets (PreAct-ResNet18, 6.7 hours on 2 CPU cores: train it on a GPU): the own-* models
# of scripts/models.sh. It runs from the repository root: a relative DIR or SHARED is taken from there.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-var/own}
shift || true
train=${SHARED:-../shared}/datasets/cifar10/train.tar.gz
source scripts/models.sh
mkdir -p "$out"
for name in ${*:-warp blend badnets sig patch}; do
  [ -n "${target[own-$name]:-}" ] || { echo "unknown model own-$name: scripts/models.sh lists them" >&2; exit 2; }
  trigger=scripts/triggers/own-$name.json
  rate=0.1
  [[ $name == sig ]] && rate=0.8
  .venv/bin/nad attack --arch "$(arch_of "own-$name")" --data "$train" --trigger "$trigger" \
    --target-label "${target[own-$name]}" --poison-rate "$rate" --epochs 30 --seed 0 \
    --out "$out/$(checkpoint_of "own-$name")"
done
