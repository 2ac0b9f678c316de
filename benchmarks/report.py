"""Result files of a benchmark run: ``<host>-<date>.json`` (everything measured),
``<host>-<date>.md`` (the tables), two PNG plots, and ``latest.md`` (a copy of the
newest table)."""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from pathlib import Path


def _f(x, nd: int = 1) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, (int, float)):
        return f"{x:.{nd}f}" if isinstance(x, float) else str(x)
    return str(x)


def _g(d: dict | None, *keys):
    for k in keys:
        if isinstance(d, dict):
            d = d.get(k)
        elif isinstance(d, (list, tuple)) and isinstance(k, int) and -len(d) <= k < len(d):
            d = d[k]
        else:
            return None
    return d


def stem(result: dict) -> str:
    started = result.get("started") or datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    t = datetime.strptime(started, "%Y-%m-%dT%H:%M:%SZ")
    host = re.sub(r"[^A-Za-z0-9_.-]", "_", result.get("host", "host"))
    return f"{host}-{t.strftime('%Y%m%d-%H%M')}"


def _table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += [
        "| " + " | ".join(_f(c) if not isinstance(c, str) else c for c in r) + " |" for r in rows
    ]
    return out


def markdown(result: dict) -> str:
    r = result
    L = [f"# streamasr benchmark — {r.get('host')} {r.get('started')}", ""]
    L.append(
        f"Model `{r.get('model')}`, chunk {_f(r.get('chunk_ms'))} ms, "
        f"{r.get('cpu_count')} CPU cores, onnxruntime intra-op threads "
        f"{r.get('intra_op_threads', '–')} (0 = one per core), "
        f"{'quick run' if r.get('quick') else 'full run'}, "
        f"{r.get('connections', 1)} gRPC stream(s) per level. "
        f"Load average (1 min) is shown beside every figure: the cores are shared with "
        f"other work, and numbers taken under load are pessimistic."
    )
    L += ["", "## Paced streams (real-time, open loop)", ""]
    lv_all = r.get("levels") or []
    top_ok = (
        bool(lv_all)
        and lv_all[-1].get("within_budget")
        and lv_all[-1]["streams"] == r.get("held_streams")
    )
    L.append(
        f"Budget: p99 chunk latency ≤ {_f(r.get('budget_ms'), 0)} ms, no errors, sender on "
        f"schedule. **Streams held: {'≥ ' if top_ok else ''}{_f(r.get('held_streams'))}**"
        + (" (every level tried was within budget)" if top_ok else "")
        + (
            f" (compute limit ≈ {_f(r.get('compute_limit_streams'))} streams, "
            f"ratio {_f(r.get('held_vs_limit'), 2)})"
            if r.get("compute_limit_streams")
            else ""
        )
    )
    L.append("")
    rows = []
    for lv in r.get("levels", []):
        lat = lv.get("chunk_latency_ms", {})
        rows.append(
            [
                lv["streams"],
                lat.get("p50"),
                lat.get("p90"),
                lat.get("p99"),
                _g(lv, "first_text_ms", "p50"),
                _g(lv, "onset_interim_ms", "p50"),
                _g(lv, "final_ms", "p50"),
                _g(lv, "final_ms", "p99"),
                lv.get("late_chunks"),
                lv.get("errors"),
                _g(lv, "server", "acoustic_model", "windows_per_s"),
                _g(lv, "server", "acoustic_model", "mean_batch"),
                _g(lv, "cpu", "cores_busy"),
                _g(lv, "loadavg_after", 0),
                "yes" if lv.get("within_budget") else "**no**",
            ]
        )
    L += _table(
        [
            "streams",
            "chunk p50 ms",
            "p90",
            "p99",
            "first text p50",
            "onset interim p50",
            "final p50",
            "final p99",
            "late chunks",
            "errors",
            "windows/s",
            "mean batch",
            "cores busy",
            "load avg",
            "in budget",
        ],
        rows,
    )
    L += [
        "",
        "chunk latency: chunk sent → its interim back. first text: speech onset spoken → "
        "first non-empty transcript. onset interim: onset spoken → interim of the chunk "
        "holding it. final: last chunk (END) sent → final. late chunk: result arrived after "
        "the next chunk was spoken. cores busy: CPU seconds of tritonserver, its Python "
        "stubs and the client per wall second.",
    ]
    sat = r.get("saturation")
    if sat:
        L += ["", "## Throughput limit (closed loop) vs raw onnxruntime", ""]
        srv = _g(sat, "server", "acoustic_model") or {}
        L.append(
            f"{sat['streams']} sessions, each sending its next chunk as soon as the "
            f"previous is answered, {_f(sat.get('wall_s'))} s: "
            f"**{_f(srv.get('windows_per_s'))} windows/s** "
            f"({_f(sat.get('realtime_factor'), 2)}× real time), batches formed "
            f"{srv.get('batch_hist')}, load avg {_f(_g(sat, 'loadavg_after', 0))}."
        )
        ov = r.get("overhead") or {}
        for key in ("overhead_closed_loop", "overhead_paced_peak"):
            o = r.get(key)
            if o and o.get("measured_in") != (ov or {}).get("measured_in"):
                L.append(
                    f"{o['measured_in']}: server {_f(o.get('server_windows_per_s'))} "
                    f"windows/s, raw onnxruntime at its batch mix "
                    f"{_f(o.get('raw_windows_per_s'))} → {_f(o.get('ratio'), 2)}."
                )
        if ov:
            L.append(
                f"Target basis ({ov.get('measured_in')}, the server's highest throughput): "
                f"server **{_f(ov.get('server_windows_per_s'))} windows/s**, raw onnxruntime "
                f"at the same batch mix **{_f(ov.get('raw_windows_per_s'))} "
                f"windows/s** → server / raw = **{_f(ov.get('ratio'), 2)}** "
                f"(target ≥ 0.85). Best raw batch size: {ov.get('best_batch')} "
                f"({_f(ov.get('best_raw_windows_per_s'))} windows/s). Raw timed at load avg "
                f"{_f(_g(r, 'raw_loadavg_before', 0))}–{_f(_g(r, 'raw_loadavg_after', 0))}."
            )
        rac = r.get("raw_all_cores")
        if rac:
            L.append(
                f"Raw onnxruntime with every core busy ({rac['sessions']} sessions × "
                f"{rac['intra_op_threads']} thread, batch {rac['batch']}, in parallel): "
                f"{_f(rac.get('windows_per_s'))} windows/s → "
                f"{_f(r.get('compute_limit_streams_all_cores'))} streams."
            )
        L.append("")
        rows = []
        raw = r.get("raw", {})
        by_b = srv.get("compute_infer_ms_by_batch", {})
        for b in sorted({int(k) for k in raw} | {int(k) for k in by_b}):
            rb = raw.get(str(b)) or raw.get(b) or {}
            s_ms = by_b.get(str(b))
            rows.append(
                [
                    b,
                    rb.get("median_ms"),
                    rb.get("windows_per_s"),
                    s_ms,
                    round(b / s_ms * 1000, 1) if s_ms else None,
                    _g(srv, "batch_hist", str(b)),
                ]
            )
        L += _table(
            [
                "batch",
                "raw ms/call",
                "raw windows/s",
                "server compute_infer ms",
                "server windows/s in call",
                "server batches",
            ],
            rows,
        )
        steps = []
        for m in ("feature_extractor", "acoustic_model", "ctc_decoder", "streaming_asr"):
            e = _g(sat, "server", m) or {}
            steps.append([m, e.get("requests"), e.get("queue_ms"), e.get("compute_infer_ms")])
        L += ["", "Per-request cost in the server at the throughput limit (Triton statistics):", ""]
        L += _table(["model", "requests", "queue ms", "compute_infer ms"], steps)
        cpu = _g(sat, "cpu", "cpu_s") or {}
        if cpu:
            L += [
                "",
                "CPU seconds by process during it: "
                + ", ".join(f"{k} {v:.1f}" for k, v in cpu.items() if v >= 0.05),
            ]
    one = (r.get("levels") or [None])[0]
    if one and one.get("server"):
        L += [
            "",
            "Python steps at 1 stream (Triton statistics, per request): "
            + ", ".join(
                f"{m} compute_infer {_f(_g(one, 'server', m, 'compute_infer_ms'), 2)} ms"
                for m in ("feature_extractor", "acoustic_model", "ctc_decoder")
            ),
        ]
    pa = r.get("perf_analyzer")
    if pa:
        L += ["", "## perf_analyzer (Triton's tool, closed loop, real audio chunks)", ""]
        if pa.get("rows"):
            L += _table(
                ["concurrency", "infer/s", "p50 ms", "p90 ms", "p99 ms"],
                [
                    [
                        int(x["Concurrency"]),
                        x.get("Inferences/Second"),
                        x.get("p50 latency"),
                        x.get("p90 latency"),
                        x.get("p99 latency"),
                    ]
                    for x in pa["rows"]
                ],
            )
            L += ["", f"`{pa.get('command')}`"]
        else:
            L.append(f"did not complete: {str(pa.get('error', ''))[:300]}")
    acc = r.get("accuracy")
    ps = r.get("peer_pocketsphinx")
    if acc or ps:
        acc = acc or {"error": "skipped (--skip accuracy)"}
        L += ["", "## Accuracy", ""]
        rows = []
        if acc.get("error"):
            L.append(f"not measured: {acc['error']}")
        else:
            L.append(
                f"Eval set: {acc.get('eval_set')} ({acc.get('utterances')} utterances, "
                f"{_f(acc.get('audio_s'))} s)."
            )
            rows = [
                [k, _f(_g(acc, k, "wer"), 3), _f(_g(acc, k, "cer"), 3)]
                for k in ("streamed", "offline")
                if k in acc
            ]
        if ps and ps.get("wer") is not None:
            rows.append(
                [
                    f"peer: {ps.get('system')} (whole file, RTF {_f(ps.get('rtf'), 2)})",
                    _f(ps["wer"], 3),
                    _f(ps.get("cer"), 3),
                ]
            )
        if rows:
            L += [""] + _table(["decoding", "WER", "CER"], rows)
        if acc.get("streamed_equals_offline") is not None:
            L += [
                "",
                f"Streamed transcript identical to offline on "
                f"{acc['streamed_equals_offline']}/{acc.get('utterances')} utterances.",
            ]
        if ps and ps.get("wer") is not None:
            L += [
                "",
                f"Peer (benchmarks/peer_pocketsphinx.py): {ps['clips']} clips, "
                f"{ps.get('words')} words, {_f(ps.get('audio_s'))} s decoded in "
                f"{_f(ps.get('decode_s'))} s wall ({_f(ps.get('decode_cpu_s'))} s CPU, RTF "
                f"{_f(ps.get('rtf_cpu'), 2)}), load avg {_f(_g(ps, 'loadavg_after', 0))}.",
            ]
        elif ps:
            L += [
                "",
                f"Peer pocketsphinx {'skipped' if ps.get('skipped') else 'failed'}: "
                f"{ps.get('skipped') or ps.get('error')}",
            ]
    tp = r.get("two_pass")
    if tp:
        L += two_pass_section(tp)
    fin = r.get("finals")
    if fin:
        from .finals import section as finals_section

        L += ["", "## Last word -> final, paced (benchmarks/finals.py)", ""]
        L += [f"not measured: {fin['error']}"] if fin.get("error") else finals_section(fin)
    ov = r.get("overload")
    if ov:
        L += ["", "## Overload: 3x the admission limit (benchmarks/overload.py)", ""]
        if ov.get("error"):
            L.append(f"not measured: {ov['error']}")
        else:
            adm = ov["admitted"]
            L.append(
                f"Admission limit {ov['capacity']}; {ov['offered_streams']} paced streams "
                f"offered for {_f(ov['duration_s'], 0)} s, refused ones retrying every "
                f"{_f(ov['retry_s'], 1)} s: {ov['admitted_sessions']} admitted, "
                f"{ov['refused_starts']} STARTs refused. Admitted chunk latency p50 / p99 / "
                f"max {_f(adm['chunk_latency_ms']['p50'])} / "
                f"{_f(adm['chunk_latency_ms']['p99'])} / {_f(adm['chunk_latency_ms']['max'])}"
                f" ms, {adm['errors']} errors; transcripts changed "
                f"{ov['transcripts_changed']} of {ov['transcripts_compared']}; refusal "
                f"p50 / max {_f(ov['refusal_ms']['p50'])} / {_f(ov['refusal_ms']['max'])} ms;"
                f" RSS baseline {ov['rss_kib']['baseline'] / 1024:.0f} MiB, peak "
                f"{ov['rss_kib']['peak'] / 1024:.0f} MiB, {_f(ov['rss_kib']['after_s'], 0)} s "
                f"after {ov['rss_kib']['after'] / 1024:.0f} MiB."
            )
    ho = r.get("hostile")
    if ho:
        L += ["", "## Hostile clients beside paced bystanders (benchmarks/hostile.py)", ""]
        if ho.get("error"):
            L.append(f"not measured: {ho['error']}")
        else:
            L.append(f"Table and figures: `{ho.get('folder')}/README.md`; targets below.")
    nv = r.get("naive")
    if nv:
        L += ["", "## Peer: re-transcribe the growing buffer each chunk", ""]
        L.append(nv.get("summary", ""))
    t = r.get("targets")
    if t:
        L += ["", "## Targets", ""]
        L += _table(
            ["target", "measured", "met"],
            [
                [
                    x["target"],
                    x["measured"],
                    "yes" if x["met"] else ("**no**" if x["met"] is False else "–"),
                ]
                for x in t
            ],
        )
    prof = r.get("profile")
    if prof:
        L += ["", "## Where the time goes", ""]
        L += [f"- {line}" for line in prof.get("summary", [])]
    if r.get("server_crashes"):
        L += ["", "## Server crashes during the run", ""]
        for c in r["server_crashes"]:
            L.append(
                f"- during {c['phase']}: tritonserver exited ({c.get('exit_code')}), load avg "
                f"{_g(c, 'loadavg', 0)}; log: `{' | '.join(c.get('log', [])[-3:])[:400]}`"
            )
    if r.get("notes"):
        L += ["", "## Notes", ""] + [f"- {n}" for n in r["notes"]]
    if r.get("plots"):
        L += [""] + [f"![{Path(p).stem}]({Path(p).name})" for p in r["plots"]]
    return "\n".join(L) + "\n"


def two_pass_section(tp: dict) -> list[str]:
    """The two-pass / Whisper-interim tables (benchmarks/two_pass.py)."""
    L: list[str] = []
    L += ["", "## Two-pass finals (benchmarks/two_pass.py)", ""]
    if tp.get("error"):
        L.append(f"not measured: {tp['error']}")
    else:
        L.append(
            f"{tp['clips']} clips ({_f(tp.get('audio_s'))} s), one stream at a time, "
            f"{'paced at real time' if tp.get('paced') else 'unpaced'}; final latency "
            "= END sent after the last chunk -> last response."
        )
        modes = [k for k in ("one_pass", "two_pass", "two_pass_whisper_interims") if k in tp]
        L += [""] + _table(
            [
                "mode (model, options)",
                "final WER / CER",
                "END -> final p50 / p99 ms",
                "interim WER",
                "interim words changed",
                "correct word after (median s)",
                "chunk latency p50 / p99 ms",
                "server CPU s per audio s",
            ],
            [
                [
                    f"{k.replace('_', '-')} (`{tp[k]['model']}`"
                    + (f", {tp[k]['options']}" if tp[k].get("options") else "")
                    + ")",
                    f"{_f(tp[k]['wer'], 3)} / {_f(tp[k]['cer'], 3)}",
                    " / ".join(_f(_g(tp[k], "final_latency_ms", q)) for q in ("p50", "p99")),
                    _f(tp[k].get("interim_wer"), 3),
                    _f(tp[k].get("interim_words_changed"), 3),
                    _f(_g(tp[k], "time_to_correct_word_s", "median"), 2),
                    " / ".join(_f(_g(tp[k], "chunk_latency_ms", q)) for q in ("p50", "p99")),
                    _f(tp[k].get("server_cpu_s_per_audio_s"), 3),
                ]
                for k in modes
            ],
        )
        # results before 2026-12-03 have two-pass levels only, without chunk latency
        levels = tp.get("concurrent") or [
            {"mode": "two_pass", **lv} for lv in tp.get("two_pass_concurrent", [])
        ]
        conc = [lv for lv in levels if lv.get("final_latency_ms")]
        if conc:
            L += [
                "",
                "Several paced streams at once (one `final_pass` instance, dynamic "
                f"batching); held = chunk latency p99 <= {_f(tp.get('chunk_p99_budget_ms'))} "
                "ms and no errors:",
                "",
            ]
            L += _table(
                [
                    "mode",
                    "streams",
                    "finals",
                    "END -> final p50 / p99 / max ms",
                    "chunk p50 / p99 ms",
                    "caption WER",
                    "interim words changed",
                    "refreshes",
                    "held",
                    "errors",
                    "load avg 1 min (start / end)",
                ],
                [
                    [
                        lv["mode"].replace("_", "-"),
                        lv["streams"],
                        lv["finals"],
                        " / ".join(
                            _f(_g(lv, "final_latency_ms", q)) for q in ("p50", "p99", "max")
                        ),
                        " / ".join(_f(_g(lv, "chunk_latency_ms", q)) for q in ("p50", "p99")),
                        _f(lv.get("interim_wer"), 3),
                        _f(lv.get("interim_words_changed"), 3),
                        lv.get("refreshes", "–"),
                        "yes" if lv.get("held") else "no",
                        len(lv["errors"]),
                        " / ".join(_f(x, 1) for x in lv.get("loadavg_1m", [])) or "–",
                    ]
                    for lv in conc
                ],
            )
        sweep = tp.get("refresh_sweep") or []
        if sweep:
            L += ["", "Whisper interims by `interim_refresh_s` (1 stream, paced):", ""]
            L += _table(
                [
                    "interim_refresh_s",
                    "interim WER",
                    "interim words changed",
                    "correct word after (median / p90 s)",
                    "chunk p99 ms",
                    "server CPU s per audio s",
                ],
                [
                    [
                        _f(x["interim_refresh_s"]),
                        _f(x["interim_wer"], 3),
                        _f(x["interim_words_changed"], 3),
                        f"{_f(_g(x, 'time_to_correct_word_s', 'median'), 2)} / "
                        f"{_f(_g(x, 'time_to_correct_word_s', 'p90'), 2)}",
                        _f(_g(x, "chunk_latency_ms", "p99")),
                        _f(x.get("server_cpu_s_per_audio_s"), 3),
                    ]
                    for x in sweep
                ],
            )
    return L


def plots(result: dict, out_dir: Path, base: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    levels = result.get("levels") or []
    if levels:
        fig, ax = plt.subplots(figsize=(6, 4))
        n = [lv["streams"] for lv in levels]
        for key, style in (("p50", "o-"), ("p90", "s--"), ("p99", "^-")):
            ax.plot(n, [lv["chunk_latency_ms"].get(key) for lv in levels], style, label=key)
        ax.axhline(result.get("budget_ms", 250), color="r", lw=0.8, label="budget")
        ax.set_xlabel("concurrent streams (real-time pace)")
        ax.set_ylabel("chunk latency, ms")
        ax.set_yscale("log")
        loads = [lv.get("loadavg_after", [None])[0] for lv in levels]
        loads = [x for x in loads if x is not None]
        ax.set_title(
            "chunk latency vs streams"
            + (f" (load avg {min(loads):.1f}-{max(loads):.1f})" if loads else "")
        )
        ax.legend()
        p = out_dir / f"{base}-latency.png"
        fig.tight_layout()
        fig.savefig(p, dpi=100)
        plt.close(fig)
        made.append(p)
    raw = result.get("raw") or {}
    srv = _g(result, "saturation", "server", "acoustic_model", "compute_infer_ms_by_batch") or {}
    if raw or srv:
        fig, ax = plt.subplots(figsize=(6, 4))
        if raw:
            bs = sorted(int(b) for b in raw)
            ax.plot(bs, [raw[str(b)]["windows_per_s"] for b in bs], "o-", label="raw onnxruntime")
        if srv:
            bs = sorted(int(b) for b in srv)
            ax.plot(
                bs, [b / srv[str(b)] * 1000 for b in bs], "s", label="server (in compute_infer)"
            )
        sat = _g(result, "saturation", "server", "acoustic_model", "windows_per_s")
        if sat:
            ax.axhline(sat, color="g", lw=0.8, label="server end to end (closed loop)")
        ax.set_xlabel("batch size")
        ax.set_ylabel("windows / s")
        ax.set_xscale("log", base=2)
        ax.set_title("acoustic-model throughput vs batch size")
        ax.legend()
        p = out_dir / f"{base}-throughput.png"
        fig.tight_layout()
        fig.savefig(p, dpi=100)
        plt.close(fig)
        made.append(p)
    return made


def write_results(result: dict, out_dir: Path, plots: bool = True) -> dict[str, Path]:
    """Write JSON, Markdown (+ plots) and latest.md; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    base = stem(result)
    if plots:
        result["plots"] = [p.name for p in globals()["plots"](result, out_dir, base)]
    paths = {
        "json": out_dir / f"{base}.json",
        "md": out_dir / f"{base}.md",
        "latest": out_dir / "latest.md",
    }
    paths["json"].write_text(json.dumps(result, indent=1, default=str) + "\n")
    md = markdown(result)
    paths["md"].write_text(md)
    paths["latest"].write_text(md)
    return paths
