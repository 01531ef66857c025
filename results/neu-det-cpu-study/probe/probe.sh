#!/bin/bash
# #14 item 3: does a larger DDPM input carry more defect-class information? For SIZE in $@:
# DDPM (tiny, 600 steps, batch 16, lr 5e-4 as configs/neu-det-cpu.yaml) on NEU-DET splits3 train at SIZE px,
# repositories of train and val, linear probe per level (val). Resumable: each step skips when done.
# Usage: DATA=<an imported NEU-DET splits3 dataset> WORK=<a scratch folder> probe.sh 16 32 64
# (run from the checkout; as measured, DATA was the study's d3n-s0 data/dataset).
set -e
: "${DATA:?set DATA to an imported NEU-DET dataset (d3n data import ... --splits splits3)}"
: "${WORK:?set WORK to a scratch folder}"
D3N="${D3N:-python -m d3n.cli}"
for S in "$@"; do
  O=$WORK/s$S
  mkdir -p $O
  echo "=== $(date -Is) size $S ddpm"
  [ -f $O/ddpm/manifest.json ] || $D3N ddpm train --data $DATA --out $O/ddpm --preset tiny --size $S --steps 600 --batch 16 --lr 0.0005 --seed 0
  for split in train val; do
    echo "=== $(date -Is) size $S repo $split"
    [ -f $O/repo-$split/manifest.json ] || $D3N repo build --ddpm $O/ddpm --data $DATA --out $O/repo-$split --split $split
  done
  echo "=== $(date -Is) size $S probe"
  $D3N repo probe --repo $O/repo-train --eval-repo $O/repo-val --data $DATA --json $O/probe.json
done
echo "=== $(date -Is) done"
