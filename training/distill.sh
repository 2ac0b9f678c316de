#!/bin/sh
# The streaming encoder's distillation run (training/README.md, "Streaming encoder"):
# background, lowest priority, one thread, resumable. Start or resume with
#   setsid nohup training/distill.sh > build/distill/nohup.out 2>&1 &
# (needs build/synth, build/asterisk and build/real_speech: the recipe's data steps).
cd "$(dirname "$0")/.." || exit 1
mkdir -p build/distill
exec nice -n 19 .venv/bin/python -m training.distill --out build/distill --resume --threads 1 \
    --data build/synth/manifest.jsonl --data build/asterisk/train.jsonl:2 \
    --data build/real_speech/manifest.jsonl:10 \
    --heldout build/synth/heldout.jsonl --heldout build/asterisk/test.jsonl \
    --eval-every 150 --checkpoint-minutes 5 "$@"
