"""The stop rule of issue 26: a CTC head trained on the distilled streaming encoder's frames,
against the same head on full-context Whisper frames, same data, same steps.

    nice -n 19 python -m training.eval_student --checkpoint build/distill/last.pt \\
        --manifest build/synth/manifest.jsonl --real build/real_speech/manifest.jsonl:20 \\
        --steps 400 --heldout build/synth/heldout.jsonl --heldout build/asterisk/test.jsonl

It is the ablation's row (b)/(a) recipe (training/README.md: ``train_ctc``'s cache, training
loop and evaluation) with one change: the 35 frames the head reads per serving window come
from the student (``streaming_encoder.head_frames``: 10 frames before the chunk, the chunk, 4
look-ahead frames + the last one repeated), computed once per utterance by the streaming
encoder exactly as chunk-by-chunk serving would. Row (a) — the head on full-context frames —
is ``python -m training.train_ctc ... --frames full`` on the same data; if the student's CER
is more than 2 points behind it after a fair try, the issue says: commit the table, keep
today's encoder.

Writes ``OUT.npz`` (the head) and ``OUT.json`` (WER/CER per set).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from pathlib import Path

import numpy as np
import torch

from streamasr.artifacts import acoustic, ct2, whisper
from training import streaming_encoder as se
from training import train_ctc

log = logging.getLogger("training.eval_student")


def load_student(checkpoint: Path) -> se.StreamingEncoder:
    ck = torch.load(checkpoint, weights_only=False)
    cfg = se.StreamConfig(**ck["config"])
    student = se.StreamingEncoder(
        whisper.encoder_from_ct2(ct2.load(ct2.packaged_whisper_dir())), cfg
    )
    student.load_state_dict(ck["model"])
    return student.eval()


def student_windows_encoder(student: se.StreamingEncoder, contract, head_cfg: acoustic.HeadConfig):
    """A drop-in for ``train_ctc``'s encoder callable: serving windows [N, W, F] -> [N, W/2,
    d] whose ``head_slice`` holds the student's head frames for each window (the rest is
    unused and zero)."""
    sl = acoustic.head_slice(contract, head_cfg)
    n_out = contract.window_frames // contract.subsampling
    width = n_out - sl.start
    skip = contract.left_frames - se.PAD_CHUNKS * contract.chunk_frames

    @torch.no_grad()
    def run(window_features: np.ndarray) -> np.ndarray:
        seq = train_ctc.full_sequence(contract, window_features)[skip:].astype(np.float32)
        main, look = student.forward_parallel(torch.from_numpy(seq[None]))
        hf = se.head_frames(
            student.cfg, main[0].numpy(), look[0].numpy(), head_cfg.head_left, width
        )
        out = np.zeros((len(window_features), n_out, hf.shape[-1]), np.float32)
        out[:, sl.start :] = hf
        return out

    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m training.eval_student",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--manifest", type=Path, required=True)
    p.add_argument("--real", type=train_ctc.parse_real, action="append", default=[])
    p.add_argument("--heldout", type=Path, action="append", default=[])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-utterances", type=int)
    p.add_argument("--out", type=Path, default=Path("build/eval_student/head"))
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(a.threads)

    student = load_student(a.checkpoint)
    ck_step = torch.load(a.checkpoint, weights_only=False)["step"]
    contract = acoustic.default_contract()
    cfg = acoustic.HeadConfig()
    encoder = student_windows_encoder(student, contract, cfg)
    # one cache per checkpoint: the cache key does not name the encoder
    train_ctc.CACHE = a.out.parent / f"ctc_cache_step{ck_step}"
    items = train_ctc.read_manifest(a.manifest)
    random.Random(0).shuffle(items)
    if a.max_utterances:
        items = items[: a.max_utterances]
    n_dev = max(1, int(len(items) * 0.03))  # train_ctc's dev split
    t0 = time.time()
    dev = train_ctc.Corpus([train_ctc.precompute(items[:n_dev], contract, encoder, cfg, seed=1)])
    caches = [train_ctc.precompute(items[n_dev:], contract, encoder, cfg, seed=0)]
    for path, repeat in a.real:
        caches.append(
            train_ctc.precompute(train_ctc.read_manifest(path) * repeat, contract, encoder, cfg)
        )
    corpus = train_ctc.Corpus(caches)
    log.info("precomputed %d windows in %.1f min", corpus.n_windows, (time.time() - t0) / 60)
    head = acoustic.CTCHead(cfg, contract.output_frames)
    info = train_ctc.train(head, corpus, dev, lr=a.lr, steps=a.steps)
    sl = acoustic.head_slice(contract, cfg)

    def runner(feats: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return head(torch.from_numpy(encoder(feats)[:, sl])).numpy()

    res = train_ctc.evaluate_real(runner, contract)
    out = {
        "checkpoint": str(a.checkpoint),
        "checkpoint_step": ck_step,
        "head_steps": info["steps"],
        "history": info["history"],
        "real": {k: {m: r[m] for m in ("wer", "cer", "clips", "words")} for k, r in res.items()},
    }
    for path in a.heldout:
        out[f"heldout:{path.parent.name}/{path.stem}"] = train_ctc.evaluate_heldout(
            runner, contract, path
        )
    a.out.parent.mkdir(parents=True, exist_ok=True)
    acoustic.save_head(head, a.out.with_suffix(".npz"), eval_student=out)
    a.out.with_suffix(".json").write_text(json.dumps(out, indent=1))
    for name, r in out["real"].items():
        log.info("REAL %s: WER %.1f %% CER %.1f %%", name, 100 * r["wer"], 100 * r["cer"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
