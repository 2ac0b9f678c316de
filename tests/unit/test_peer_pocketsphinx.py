"""The accuracy peer (benchmarks/peer_pocketsphinx.py): real PocketSphinx on one real eval
clip, scored by the project's own WER. pocketsphinx is pinned in requirements-dev.txt, so a
missing install fails here rather than being skipped."""

from __future__ import annotations

import json

from benchmarks import peer_pocketsphinx as peer
from benchmarks import report
from streamasr.core.evaluation import EvalItem, load_eval_set

CLIP = "cards-001"  # 1.1 s, "ten of clubs"


def test_pocketsphinx_decodes_a_real_clip_with_a_sane_wer(tmp_path, monkeypatch):
    assert peer.unavailable() is None
    item = next(i for i in load_eval_set() if i.name == CLIP)
    dec = peer.make_decoder()
    res = peer.run([item], decoder=dec)

    assert res["clips"] == 1 and res["words"] == len(item.reference.split()) == 3
    hyp = res["per_clip"][0]["hyp"]
    assert hyp.strip(), "pocketsphinx returned an empty hypothesis"
    assert 0.0 <= res["wer"] < 1.0, res["per_clip"]
    assert 0.0 <= res["cer"] < 1.0, res["per_clip"]
    assert "clubs" in hyp.split(), hyp
    assert res["audio_s"] == 1.1 and res["decode_s"] > 0 and res["rtf"] > 0
    assert res["system"].startswith("pocketsphinx ")
    assert res["model"] == {"hmm": "en-us", "lm": "en-us.lm.bin", "dict": "cmudict-en-us.dict"}

    # the scoring compares against the reference: the same audio against a wrong one scores badly
    wrong = EvalItem(item.name, item.audio_path, "queen of hearts and a joker")
    assert peer.run([wrong], decoder=dec)["wer"] > 0.5

    # the CLI writes the same dict (eval set cut to the short clip to stay fast)
    monkeypatch.setattr(peer, "load_eval_set", lambda: [item])
    out = tmp_path / "peer.json"
    assert peer.main(["--quiet", "--json", str(out)]) == 0
    written = json.loads(out.read_text())
    assert written["clips"] == 1 and written["per_clip"][0]["hyp"] == hyp


def test_bench_step_records_a_skip_with_its_reason(monkeypatch):
    monkeypatch.setattr(peer, "unavailable", lambda: "pocketsphinx not importable (test)")
    res = peer.run_step(progress=lambda _m: None)
    assert res == {"skipped": "pocketsphinx not importable (test)"}


def test_bench_report_carries_the_peer_row_or_the_skip_reason():
    acc = {
        "eval_set": "eval",
        "utterances": 11,
        "audio_s": 45.4,
        "streamed": {"wer": 0.6931, "cer": 0.2754},
        "offline": {"wer": 0.6931, "cer": 0.2754},
    }
    ps = {
        "system": "pocketsphinx 5.1.1",
        "wer": 0.2281,
        "cer": 0.1446,
        "rtf": 0.47,
        "clips": 11,
        "words": 114,
        "audio_s": 45.4,
        "decode_s": 21.5,
        "loadavg_after": [1.0],
    }
    md = report.markdown({"accuracy": acc, "peer_pocketsphinx": ps})
    assert "| peer: pocketsphinx 5.1.1 (whole file, RTF 0.47) | 0.228 | 0.145 |" in md
    assert "| streamed | 0.693 | 0.275 |" in md
    md = report.markdown({"accuracy": acc, "peer_pocketsphinx": {"skipped": "no module (test)"}})
    assert "Peer pocketsphinx skipped: no module (test)" in md and "| peer:" not in md
