"""The benchmarks' pure helpers: percentiles, lateness, onset, level selection, report
files.  No server needed."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from benchmarks import metrics


def test_percentile_matches_numpy_linear():
    rng = np.random.default_rng(0)
    xs = list(rng.exponential(0.05, 101))
    for q in (0, 1, 50, 90, 99, 100):
        assert metrics.percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    assert metrics.percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert metrics.percentile([1.0, 2.0], 50) == 1.5
    assert metrics.percentile([], 50) is None
    with pytest.raises(ValueError):
        metrics.percentile([1.0], 101)


def test_summarize_converts_seconds_to_ms():
    s = metrics.summarize([0.010, 0.020, 0.030])
    assert s == {"n": 3, "p50": 20.0, "p90": 28.0, "p99": 29.8, "mean": 20.0, "max": 30.0}
    assert metrics.summarize([])["p99"] is None


def test_lateness_is_never_negative_and_pairs_entries():
    assert metrics.lateness([1.0, 2.0, 3.0], [0.9, 2.05, 3.5]) == pytest.approx([0.0, 0.05, 0.5])
    with pytest.raises(ValueError):
        metrics.lateness([1.0], [1.0, 2.0])


def test_behind_real_time_flags_late_missing_and_growing_lag():
    chunk = 0.4
    capture = [i * chunk for i in range(1, 10)]
    steady = [c + 0.05 for c in capture]
    b = metrics.behind_real_time(capture, steady, chunk)
    assert b == {"chunks": 9, "late": 0, "missing": 0, "max_lag_s": 0.05, "growing": False}
    # lag grows by 0.3 s per chunk: a backlog building up
    growing = [c + 0.3 * i for i, c in enumerate(capture)]
    b = metrics.behind_real_time(capture, growing, chunk)
    assert b["growing"] and b["late"] == 7
    b = metrics.behind_real_time(capture, steady[:-1] + [None], chunk)
    assert b["missing"] == 1 and b["late"] == 1


def test_speech_onset_finds_the_first_loud_frame():
    sr = 16000
    audio = np.zeros(sr, np.float32)
    audio[5000:9000] = 0.3 * np.sin(np.arange(4000) * 0.3)
    onset = metrics.speech_onset(audio, sr)
    assert 4840 <= onset <= 5000  # within one 10 ms frame before the start
    assert metrics.speech_onset(np.zeros(sr, np.float32), sr) is None


def _level(n, p99, errors=0, missing=0, late=0.0):
    return {
        "streams": n,
        "chunk_latency_ms": {"p99": p99},
        "errors": errors,
        "missing": missing,
        "send_lateness_ms": {"p99": late},
    }


def test_held_level_takes_the_largest_within_budget():
    levels = [_level(1, 40), _level(2, 90), _level(4, 240), _level(8, 900)]
    assert metrics.held_level(levels, 250)["streams"] == 4
    assert metrics.held_level(levels, 100)["streams"] == 2
    assert metrics.held_level(levels, 10) is None
    # an error or a missing answer disqualifies a level however fast it was
    assert metrics.held_level([_level(1, 40), _level(2, 50, errors=1)], 250)["streams"] == 1
    assert metrics.held_level([_level(1, 40), _level(2, 50, missing=3)], 250)["streams"] == 1
    assert metrics.held_level([_level(1, 40), _level(2, 50, late=400)], 250)["streams"] == 1


def test_batch_histogram_delta_and_mixed_throughput():
    d = metrics.batch_histogram_delta({1: 10, 2: 3}, {1: 15, 2: 3, 4: 2})
    assert d == {1: 5, 4: 2}
    with pytest.raises(ValueError):
        metrics.batch_histogram_delta({1: 10}, {1: 9})
    # 5 batches of 1 at 10 ms + 2 batches of 4 at 20 ms: 13 windows in 90 ms
    assert metrics.mixed_throughput(d, {1: 0.010, 4: 0.020}) == pytest.approx(13 / 0.090)


def test_result_files_are_written_with_table_and_latest(tmp_path):
    from benchmarks import report

    result = {
        "host": "box",
        "started": "2026-11-24T23:00:00Z",
        "quick": True,
        "budget_ms": 250.0,
        "chunk_ms": 400.0,
        "model": "m 1",
        "cpu_count": 2,
        "levels": [
            dict(
                _level(1, 40),
                chunk_latency_ms={"p50": 20.0, "p90": 30.0, "p99": 40.0},
                first_text_ms={"p50": 500.0},
                onset_interim_ms={"p50": 300.0},
                final_ms={"p50": 35.0},
                late_chunks=0,
                within_budget=True,
                loadavg_after=[1.5, 1.0, 0.5],
                server={"acoustic_model": {"windows_per_s": 2.5, "mean_batch": 1.0}},
                cpu={"cores_busy": 0.4},
            )
        ],
        "held_streams": 1,
    }
    paths = report.write_results(result, tmp_path, plots=False)
    data = json.loads(paths["json"].read_text())
    assert data["held_streams"] == 1 and data["levels"][0]["streams"] == 1
    md = paths["md"].read_text()
    assert "| 1 |" in md and "40.0" in md and "1.5" in md
    assert paths["md"].name.startswith("box-") and paths["json"].stem == paths["md"].stem
    assert (tmp_path / "latest.md").read_text() == md


def test_parse_levels_sorted_unique_and_bounded():
    import argparse

    from benchmarks.load import MAX_STREAMS, parse_levels

    assert parse_levels("4,1,2,2") == [1, 2, 4]
    for bad in ("", "0,1", "x", f"1,{MAX_STREAMS + 1}"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_levels(bad)


def test_markdown_says_at_least_when_every_level_passed():
    from benchmarks import report

    ok = dict(_level(8, 100), within_budget=True, chunk_latency_ms={"p50": 1.0, "p99": 100})
    md = report.markdown({"levels": [ok], "held_streams": 8, "budget_ms": 250.0})
    assert "Streams held: ≥ 8" in md
    over = dict(_level(16, 900), within_budget=False, chunk_latency_ms={"p50": 1.0, "p99": 900})
    md = report.markdown({"levels": [ok, over], "held_streams": 8, "budget_ms": 250.0})
    assert "Streams held: 8" in md and "≥" not in md.split("Streams held")[1][:5]


def test_markdown_has_the_two_pass_rows_from_a_committed_result():
    from benchmarks import report

    results = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
    res = json.loads((results / "two-pass-20261203.json").read_text())
    md = report.markdown({"levels": [], "held_streams": 0, "budget_ms": 250.0, "two_pass": res})
    assert "## Two-pass finals" in md
    rows = [line for line in md.splitlines() if line.startswith(("| two-pass (", "| one-pass ("))]
    assert len(rows) == 2 and f"{res['two_pass']['wer']:.3f}" in rows[1]
    assert any(line.startswith("| two-pass-whisper-interims (") for line in md.splitlines())
    assert any(line.startswith("| two-pass | 8 | 88 |") for line in md.splitlines())
    # an older result (two-pass levels only, no chunk latency) still renders
    old = json.loads((results / "two_pass-vm-20261202.json").read_text())
    md = report.markdown({"levels": [], "held_streams": 0, "budget_ms": 250.0, "two_pass": old})
    assert any(line.startswith("| two-pass | 8 | 88 |") for line in md.splitlines())


def newest_result_file() -> Path:
    """The newest committed `make bench` result (<host>-<yyyymmdd>-<hhmm>.json)."""
    results = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
    files = [p for p in results.glob("*.json") if re.fullmatch(r".+-\d{8}-\d{4}", p.stem)]
    assert files, f"no result files in {results}"
    return max(files, key=lambda p: p.stem[-13:])


def test_the_newest_committed_result_loads_through_the_typed_sections():
    from benchmarks import report
    from benchmarks.result import BenchResult, Target
    from benchmarks.run import compute_targets

    path = newest_result_file()
    data = json.loads(path.read_text())
    result = BenchResult.from_json(data)
    assert result.extra == {}, f"keys no section owns: {sorted(result.extra)}"
    assert result.capacity.levels and result.capacity.held_streams is not None
    assert result.raw_model.raw and result.run.model
    assert result.targets and all(isinstance(t, Target) for t in result.targets)
    assert result.to_json() == data  # the same JSON shape, key for key
    # the targets recomputed from the typed result include every one the run wrote
    again = [t.to_json() for t in compute_targets(result, result.run.chunk_ms / 1000)]
    assert [t for t in data["targets"] if t not in again] == []
    assert report.markdown(result.to_json()).startswith("# streamasr benchmark")


def test_result_sections_leave_out_what_a_run_did_not_measure():
    from benchmarks.result import BenchResult, RunInfo

    data = BenchResult(run=RunInfo(host="h", started="2026-01-01T00:00:00Z")).to_json()
    assert "overload" not in data and "levels" not in data and "targets" not in data
    assert data["intra_op_threads"] is None  # always written, as run.py always set it
    assert BenchResult.from_json(dict(data, future_key=1)).to_json() == dict(data, future_key=1)


def test_open_timed_opens_a_timed_session_through_the_public_api():
    """The load generator's sessions come from AsrConnection.open_session (it reached
    into the connection's private id counter, which went away with random ids)."""
    from benchmarks import load
    from streamasr_client.stream import AsrConnection

    conn = AsrConnection("127.0.0.1:1")  # never connected: nothing is sent
    try:
        s = load.open_timed(conn, t_capture0=1.5)
        other = conn.open_session()
    finally:
        conn.close()
    assert isinstance(s, load.TimedSession) and s.t_capture0 == 1.5
    assert s.sequence_id != other.sequence_id and s.conn is conn


def test_finals_bench_reports_each_level_and_judges_the_p50_targets():
    from benchmarks import finals

    def level(mode, streams, p50):
        return {
            "mode": mode,
            "streams": streams,
            "chunk_ms": 400,
            "options": {},
            "loadavg_before": [1.0, 1.0, 1.0],
            "loadavg_after": [2.0, 1.0, 1.0],
            "errors": [],
            "last_word_to_final_ms": metrics.summarize([p50 / 1000] * 3),
            "not_endpointed": 0,
            "finals_wer": 0.1,
            "finals_per_eval_clip": 1.1,
            "finals_per_demo": 5.0,
        }

    res = {"silence_s": 2.5, "levels": [level("one_pass", 1, 450), level("two_pass", 8, 900)]}
    md = "\n".join(finals.section(res))
    assert "| one_pass | 1 | 400 ms | 450.0 / 450.0 ms (3) |" in md and "| – | 1.00 -> 2.00" in md
    assert [(t.met, t.measured) for t in finals.targets(res)] == [
        (True, "450 ms"),
        (False, "900 ms"),
    ]
