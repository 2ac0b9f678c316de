#!/bin/sh
# Issue 26: the start-up calibration's pick vs the level the same machine holds, quiet and
# with a one-core CPU hog at normal priority beside it (a noisy neighbour).
cd /work/main
SKIP=perf_analyzer,accuracy,two_pass,finals,pocketsphinx,naive,profile,overload,hostile
echo "== quiet $(date -u +%T) load $(cut -d' ' -f1 /proc/loadavg)"
.venv/bin/python -m streamasr.pipeline.calibration 2>&1 | tail -n 3
.venv/bin/python -m benchmarks.run --levels 16,20,24,28,32,36,40 --skip $SKIP --out /tmp/bench/sweep-quiet 2>&1 | grep -E "streams|held|p99|level" | tail -n 20
echo "== hog $(date -u +%T)"
.venv/bin/python -c "while True: pass" &
HOG=$!
sleep 5
.venv/bin/python -m streamasr.pipeline.calibration 2>&1 | tail -n 3
.venv/bin/python -m benchmarks.run --levels 4,8,12,16,20,24 --skip $SKIP --out /tmp/bench/sweep-hog 2>&1 | grep -E "streams|held|p99|level" | tail -n 20
kill $HOG
echo "== done $(date -u +%T)"
