#!/usr/bin/env bash
# One run of the issue-11 ablation (training/README.md): a CTC head trained by
# training.train_ctc on the synthetic set, scored on every held-out set.
#   training/ablation.sh NAME THREADS ARGS...     e.g. training/ablation.sh b400 1 --steps 400 \
#       --real build/real_speech/manifest.jsonl:20
# Writes build/ablation/NAME.npz and build/logs/NAME.log.
set -euo pipefail
name=$1; threads=$2; shift 2
cd "$(dirname "$0")/.."
mkdir -p build/ablation build/logs
exec nice -n 5 .venv/bin/python -m training.train_ctc --manifest build/synth/manifest.jsonl \
  --heldout build/synth/heldout.jsonl --heldout build/asterisk/test.jsonl \
  --threads "$threads" --out "build/ablation/$name.npz" "$@" > "build/logs/$name.log" 2>&1
