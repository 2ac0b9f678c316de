"""The start-up calibration's arithmetic (streamasr.pipeline.calibration, issue 26); the
measurement itself runs in tests/integration/test_admission.py on the committed repository."""

from __future__ import annotations

import math
import threading
import time

import numpy as np
import pytest

from streamasr.pipeline import calibration as cal


def test_the_smallest_ceiling_binds():
    # 2 cores, 2 acoustic instances at 10 ms/window, decoder 4 ms, features 1 ms, 0.4 s chunks
    cpu_bound = cal.streams_ceiling(0.4, 0.010, 2, 1, 0.004, 1, 0.001, cores=2)
    assert cpu_bound == pytest.approx(2 * 0.4 / 0.015)  # all cores: 53.3
    # one slow decoder instance binds before the cores do
    assert cal.streams_ceiling(0.4, 0.010, 2, 1, 0.020, 1, 0.001, cores=16) == pytest.approx(20)
    # a single acoustic instance on many cores: the acoustic model binds
    assert cal.streams_ceiling(0.4, 0.010, 1, 1, 0.001, 4, 0.001, cores=16) == pytest.approx(40)
    # threads count as cores used while a window runs
    assert cal.streams_ceiling(0.4, 0.010, 1, 2, 0.0, 8, 0.0, cores=2) == pytest.approx(40)


def test_a_gpu_served_acoustic_model_is_no_cpu_time_and_no_ceiling_unless_timed_there():
    on_gpu = cal.streams_ceiling(0.4, None, 1, 1, 0.004, 1, 0.001, cores=8, acoustic_on_cpu=False)
    assert on_gpu == pytest.approx(0.4 / 0.004)  # the decoder instance binds
    timed = cal.streams_ceiling(0.4, 0.008, 1, 1, 0.004, 1, 0.001, cores=8, acoustic_on_cpu=False)
    assert timed == pytest.approx(0.4 / 0.008)


def test_limit_is_headroom_times_ceiling_clipped():
    for held, ceiling in cal.REFERENCE_POINTS:  # each reference day within 20 %
        assert abs(cal.limit_from_ceiling(ceiling) - held) <= 0.2 * held
    # a neighbour's share of the cores counts twice (throughput, and the wait for a core)
    assert cal.limit_from_ceiling(40, 0.5) == math.floor(cal.HEADROOM * 40 * 0.5)
    assert cal.limit_from_ceiling(0.1) == cal.MIN_LIMIT
    assert cal.limit_from_ceiling(1e9) == cal.MAX_LIMIT
    with pytest.raises(ValueError):
        cal.streams_ceiling(0.4, -1.0, 1, 1, 0.0, 1, 0.0, cores=1)


def test_calibration_signal_is_deterministic_speech_band_audio():
    a = cal.speech_like(2.0, 16000)
    assert len(a) == 32000 and a.dtype == np.float32
    assert np.array_equal(a, cal.speech_like(2.0, 16000))
    assert 0 < float(np.abs(a).max()) < 1.0
    spectrum = np.abs(np.fft.rfft(a)) ** 2  # energy
    freqs = np.fft.rfftfreq(len(a), 1 / 16000)
    assert spectrum[(freqs > 80) & (freqs < 4000)].sum() > 0.8 * spectrum.sum()


def test_usable_cores_counts_the_cores_that_run_at_once():
    # work that runs side by side (sleep, like onnxruntime, releases the GIL) gets every core
    assert cal.usable_cores(lambda: time.sleep(0.02), 4, seconds=0.06) == pytest.approx(4, rel=0.3)
    # work that cannot (a neighbour holds the other cores: here, one lock) gets one
    lock = threading.Lock()

    def serial() -> None:
        with lock:
            time.sleep(0.02)

    assert cal.usable_cores(serial, 4, seconds=0.06) == pytest.approx(1, rel=0.3)
    assert cal.usable_cores(serial, 1) == 1
