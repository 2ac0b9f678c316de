#!/bin/sh
cd /work/main
cal() { .venv/bin/python -m streamasr.pipeline.calibration 2>&1 | grep -E '"limit"|"cores"|"ceiling"|"seconds"' | tr -d '\n '; echo; }
echo "== quiet $(date -u +%T)"; cal; cal; cal
echo "== hog (one core busy)"
.venv/bin/python -c "while True: pass" & HOG=$!
sleep 3; cal; cal; cal
kill $HOG
echo "== duty hog (busy 10 ms / idle 10 ms)"
.venv/bin/python -c "
import time
while True:
    t = time.perf_counter()
    while time.perf_counter() - t < 0.010: pass
    time.sleep(0.010)
" & HOG=$!
sleep 3; cal; cal; cal
kill $HOG
echo "== done $(date -u +%T)"
