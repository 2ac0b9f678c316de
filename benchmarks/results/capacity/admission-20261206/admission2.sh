#!/bin/sh
cd /work/main
SKIP=perf_analyzer,accuracy,two_pass,finals,pocketsphinx,naive,profile,overload,hostile
cal() { .venv/bin/python -m streamasr.pipeline.calibration 2>&1 | grep -E '"limit"|"cores"|"ceiling"' | tr -d '\n '; echo; }
echo "== quiet $(date -u +%T)"; cal; cal
echo "== hog (one core busy) $(date -u +%T)"
.venv/bin/python -c "while True: pass" & HOG=$!
sleep 3; cal; cal
kill $HOG
echo "== duty hog (one thread, busy 10 ms / idle 10 ms) $(date -u +%T)"
.venv/bin/python -c "
import time
while True:
    t = time.perf_counter()
    while time.perf_counter() - t < 0.010: pass
    time.sleep(0.010)
" & HOG=$!
sleep 3; cal; cal
.venv/bin/python -m benchmarks.run --levels 12,16,20,24,28 --skip $SKIP --out /tmp/bench/sweep-duty > /tmp/bench/sweep-duty.log 2>&1
grep -E "OK|OVER|held within" /tmp/bench/sweep-duty.log
kill $HOG
echo "== done $(date -u +%T)"
