"""benchmarks/hostile.py's arithmetic and report (no server): which bystanders count as
exact, how latencies pair frames with interims, the RSS and /ping verdicts, the targets
and the README table a run writes."""

from __future__ import annotations

import argparse
import json

import pytest

from benchmarks import hostile


def _bystander(final: str, code: int = 1000, lat=(0.05, 0.1), sent=2, errors=()):
    return {
        "final": final,
        "close_code": code,
        "errors": list(errors),
        "sent": sent,
        "interims": len(lat),
        "latency_s": list(lat),
    }


def test_exact_needs_the_same_final_and_a_normal_close():
    runs = [_bystander("a b"), _bystander("a c"), _bystander("x", code=1013)]
    out = hostile.exact_count(["a b", "a b", "x"], runs)
    assert (out["exact"], out["of"]) == (1, 3)
    assert [c["bystander"] for c in out["changed"]] == [1, 2]


def test_chunk_latency_pairs_the_kth_send_with_the_kth_interim():
    # the third frame was never answered: it has no latency (counted as unanswered)
    assert hostile.chunk_latencies([1.0, 2.0, 3.0], [1.2, 2.5]) == pytest.approx([0.2, 0.5])
    s = hostile.bystander_summary([_bystander("a", lat=[0.2], sent=3, errors=["overloaded"])])
    assert s["unanswered_frames"] == 2 and s["errors"] == {"overloaded": 1}
    assert s["chunk_latency_ms"]["max"] == pytest.approx(200.0)


def test_rss_verdict_against_before_and_baseline():
    v = hostile.rss_verdict(
        before_kib=1000 * 1024, peak_kib=1500 * 1024, after_kib=1040 * 1024, baseline_kib=900 * 1024
    )
    assert v["after_vs_before_pct"] == 4.0 and v["within_tolerance"] is True
    assert v["after_vs_baseline_pct"] == pytest.approx(15.6)
    assert hostile.rss_verdict(1000, 1000, 1060, 1000)["within_tolerance"] is False
    assert hostile.rss_verdict(0, 0, 0, 0)["within_tolerance"] is None


def test_ping_summary_counts_what_was_not_200():
    s = hostile.ping_summary([(200, 0.002), (503, 0.003), (0, 5.0)])
    assert s["n"] == 3 and s["not_200"] == 2 and s["statuses"] == {"200": 1, "503": 1, "0": 1}


def _class(finals_ok=True, p99_lat=0.1, after_kib=1024 * 1000, pings=((200, 0.001),)):
    runs = [_bystander("a", lat=[0.01, p99_lat])]
    c = {
        "what": "KeepAlive frames as fast as possible",
        "exact": hostile.exact_count(["a" if finals_ok else "b"], runs),
        "bystanders": hostile.bystander_summary(runs),
        "rss": hostile.rss_verdict(1024 * 1000, 1024 * 1200, after_kib, 1024 * 1000),
        "ping": hostile.ping_summary(list(pings)),
        "attacker": {
            "sockets": 1,
            "frames_sent": 41,
            "close_codes": {"1008": 1},
            "error_codes": {"rate_limited": 1},
            "closed_after_ms": {"p50": 12.0, "max": 12.0},
            "results_received": 0,
            "still_open": 0,
        },
        "attacker_triton_requests": 0,
    }
    c["targets"] = hostile.class_targets(c)
    return c


def test_targets_met_and_missed():
    ok = [t["met"] for t in _class()["targets"]]
    assert ok == [True] * 5
    bad = _class(finals_ok=False, p99_lat=0.3, after_kib=1024 * 1100, pings=[(503, 0.001)])
    assert [t["met"] for t in bad["targets"]] == [True, False, False, False, False]
    assert _class(pings=())["targets"][4]["met"] is None  # not measured, not "met"


def test_a_server_that_died_misses_its_target_and_says_how():
    c = _class()
    c["server_alive"] = False
    c["server_exit"] = {"code": 1, "log": ["Signal (11) received."]}
    survived = hostile.class_targets(c)[0]
    assert survived["met"] is False and "Signal (11)" in survived["measured"]


def test_markdown_has_a_row_per_class_and_its_numbers():
    c = _class()
    result = {
        "run": {
            "plan": {"bystanders": 8, "bystander_s": 30.0, "frame_ms": 100.0, "settle_s": 60.0},
            "started": "2026-12-06T04:00:00Z",
            "quick": False,
            "host": "vm",
            "cpu_count": 2,
            "loadavg_start": [1.0, 1.0, 1.0],
            "loadavg_end": [1.5, 1.0, 1.0],
            "note": "",
        },
        "baseline": {"bystanders": c["bystanders"], "rss_mib": 1000.0},
        "classes": {"keepalive_flood": c},
    }
    md = hostile.markdown(result)
    row = next(line for line in md.splitlines() if line.startswith("| keepalive_flood:"))
    assert "rate_limited" in row and "1 / 1" in row and "1000.0 → 1200.0 → 1000.0" in row
    assert md.count("| keepalive_flood |") == 5  # one line per target
    json.dumps(result)  # the result file is plain JSON


def test_attacker_outcome_for_every_class_shape():
    ws = _class()["attacker"]
    shapes = {
        "reserved_fields": {"configure": ws, "query": ws},
        "bad_text": {"nested_brackets": ws},
        "keepalive_flood": ws,
        "abandoned": ws,
        "audio_flood": {**ws, "audio_s": 30.0, "frame_ms": 10.0},
        "trickle": {
            "connections": 100,
            "statuses": {"504": 100},
            "answered_after_ms": {"p50": 55000.0, "max": 55400.0},
            "still_open_at_bound": 0,
            "bound_s": 75.0,
        },
        "invocations": {
            "clients": 8,
            "requests": 20,
            "statuses": {"200": 8, "503": 12},
            "ok_ms": {"p50": 9000.0},
            "refused_ms": {"p50": 3.0},
            "refused_with_retry_after": 12,
        },
        "raw_grpc_lead": {
            "streams": 2,
            "audio_s_each": 130.0,
            "closed_at_lead": 1,
            "took_s": 80.0,
            "flooders": [{"closed_after_s": 60.0}, {"closed_after_s": None}],
        },
    }
    assert set(shapes) <= set(hostile.CLASSES)
    for name, a in shapes.items():
        line = hostile.attacker_outcome(name, a)
        assert line and "Traceback" not in line
    assert hostile.attacker_outcome("trickle", {"error": "boom"}).startswith("attack failed")


def test_parse_classes():
    assert hostile.parse_classes("") == list(hostile.CLASSES)
    assert hostile.parse_classes("trickle, abandoned") == ["trickle", "abandoned"]
    with pytest.raises(argparse.ArgumentTypeError, match="nope"):
        hostile.parse_classes("nope")


def test_quick_plan_is_smaller_in_every_bounded_loop():
    full, quick = hostile.FULL, hostile.QUICK
    for f in (
        "bystander_s",
        "settle_s",
        "keepalives",
        "trickle_connections",
        "abandoned",
        "raw_streams",
        "raw_audio_s",
        "trickle_bound_s",
    ):
        assert getattr(quick, f) < getattr(full, f), f
    assert full.bystanders == 8 and full.keepalives == 30_000 and full.brackets == 200_000


def test_make_bench_keeps_its_result_in_a_typed_section():
    from benchmarks import run
    from benchmarks.result import BenchResult

    t = {
        "class": "trickle",
        "target": "bystanders' finals exact",
        "measured": "8 of 8",
        "met": True,
    }
    res = BenchResult.from_json({"hostile": {"targets": [t]}})
    assert res.extra == {} and res.latency.hostile == {"targets": [t]}
    assert res.to_json()["hostile"] == {"targets": [t]}
    assert "hostile" in run.parse_args(["--skip", "hostile"]).skip
