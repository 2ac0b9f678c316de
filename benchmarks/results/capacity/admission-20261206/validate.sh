#!/bin/sh
# Issue 26: the start-up calibration's pick vs the paced streams the same machine holds,
# quiet and beside two kinds of busy neighbour. Three calibrations per condition; with
# --sweep also a `benchmarks.run` level sweep per condition (about 4 min each).
# (The sweeps and calibrations of README.md were run by this script's parts, 2026-12-06.)
cd "$(dirname "$0")/../../../.." || exit 1
SKIP=perf_analyzer,accuracy,two_pass,finals,pocketsphinx,naive,profile,overload,hostile
cal() { .venv/bin/python -m streamasr.pipeline.calibration 2>&1 | grep -E '"limit"|"cores"|"ceiling"' | tr -d '\n '; echo; }
condition() {  # NAME LEVELS [NEIGHBOUR PYTHON CODE]
  echo "== $1 $(date -u +%T)"
  pid=
  if [ -n "$3" ]; then .venv/bin/python -c "$3" & pid=$!; sleep 3; fi
  cal; cal; cal
  if [ "$SWEEP" = 1 ]; then
    .venv/bin/python -m benchmarks.run --levels "$2" --skip $SKIP --out "build/admission-$1" \
      | grep -E "OK|OVER|held within"
  fi
  [ -n "$pid" ] && kill "$pid"
}
SWEEP=0; [ "$1" = --sweep ] && SWEEP=1
condition quiet 16,20,24,28,32,36,40
condition one-core-hog 4,8,12,16,20,24 "while True: pass"
condition duty-hog 12,16,20,24,28 "
import time
while True:
    t = time.perf_counter()
    while time.perf_counter() - t < 0.010: pass
    time.sleep(0.010)
"
