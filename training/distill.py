"""Distil the streaming encoder (training/streaming_encoder.py) towards full-context Whisper.

    nice -n 19 python -m training.distill --out build/distill --resume \\
        --data build/synth/manifest.jsonl --data build/asterisk/train.jsonl \\
        --data build/real_speech/manifest.jsonl:10

No transcripts are needed: the target of every student frame is the frame the frozen
full-context encoder computes for the same position from one pass over the whole utterance
(padded to 10 s as in the CTC ablation, ``train_ctc.FULL_CONTEXT_MIN_FRAMES``).

* **Data**: every ``--data`` manifest (``PATH[:REPEAT]``; only the audio is read).
  Each use of an utterance draws a speed (0.9 / 1.0 / 1.1, resampled) and, with probability
  ``--aug``, gain + room reverb + noise (``train_ctc.augment``) for the student's input only:
  the teacher hears the clean (speed-changed) audio, so the student also learns to give
  clean-speech frames for noisy input. Positions start at phase 0 half of the time (a new
  stream) and at a random phase otherwise, so wraps are trained.
* **Teacher cache**: teacher frames for each (utterance, speed) are computed once and kept
  as fp16 under ``OUT/teacher/`` (about 0.77 kB per 20 ms frame).
* **Loss**: mean (1 - cosine) + 0.5 x squared error normalised by the teacher frames' mean
  square, over chunk frames and look-ahead frames. The convolutions (identical in both) and
  positions are frozen; the 4 transformer blocks and the final LayerNorm train.
* **Checkpoints**: ``OUT/last.pt`` (model, optimiser, step, data position, RNG states) every
  ``--checkpoint-minutes`` and at exit, written atomically; ``--resume`` continues from it
  exactly where it stopped. ``OUT/encoder_stepN.pt`` keeps the weights at each evaluation.
* **Log**: ``OUT/train.log`` (loss every 10 steps) and ``OUT/metrics.jsonl`` (one JSON line
  per evaluation: held-out cosine per set, at position wraps, and the bundled CTC head's
  CER on student / teacher / today's windowed frames, see ``evaluate``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from streamasr.artifacts import acoustic, ct2, whisper
from streamasr.core.features import silence_frame, whole_file_windows
from streamasr.protocol.contract import ModelContract
from training import streaming_encoder as se
from training.train_ctc import (
    FULL_CONTEXT_MIN_FRAMES,
    augment,
    ctc_greedy,
    full_sequence,
    load_audio_16k,
    read_manifest,
    real_speech_set,
)

log = logging.getLogger("training.distill")

SAMPLE_RATE = 16000
SPEEDS = (0.9, 1.0, 1.1)
SPEED_P = (0.25, 0.5, 0.25)
# Longest audio per utterance: the teacher sees at most 3000 feature frames (30 s) and the
# student sequence adds 80 padding + up to 50 tail/right frames.
MAX_AUDIO_S = 28.0
# Teacher frames' weights in the loss.
MSE_WEIGHT = 0.5
HELDOUT_PER_SET = 40
# Phase used to measure wraps on held-out clips: the wrap falls ~2 s into each clip.
WRAP_EVAL_LEAD_FRAMES = 100 + se.PAD_CHUNKS * 20


def parse_data(spec: str) -> tuple[Path, int]:
    path, _, rep = spec.partition(":")
    return Path(path), int(rep) if rep else 1


def speed_change(audio: np.ndarray, speed: float) -> np.ndarray:
    """Faster (speed > 1) = shorter, pitch shifted with it (plain resampling)."""
    if speed == 1.0:
        return audio
    from scipy.signal import resample_poly

    num = 10
    den = int(round(num * speed))
    return resample_poly(audio, num, den).astype(np.float32)


def student_sequence(contract: ModelContract, audio: np.ndarray) -> np.ndarray:
    """The streaming encoder's input for a recording (see streaming_encoder's docstring)."""
    w = whole_file_windows(contract, audio)
    skip = contract.left_frames - se.PAD_CHUNKS * contract.chunk_frames
    return full_sequence(contract, w.features)[skip:].astype(np.float32)


@dataclass
class Teacher:
    encoder: whisper.WhisperEncoder
    contract: ModelContract
    cache_dir: Path

    def frames(self, seq: np.ndarray, key: str | None, n: int) -> np.ndarray:
        """Full-context frames [n, d] of a student sequence (cached on disk by ``key``)."""
        path = self.cache_dir / f"{key}.npy" if key else None
        if path is not None and path.exists():
            out = np.load(path)
            if len(out) >= n:
                return out[:n]
        x = seq
        if len(x) < FULL_CONTEXT_MIN_FRAMES:
            pad = np.tile(
                silence_frame(self.contract.features), (FULL_CONTEXT_MIN_FRAMES - len(x), 1)
            )
            x = np.concatenate([x, pad])
        with torch.no_grad():
            out = self.encoder(torch.from_numpy(x[None].astype(np.float32)))[0, :n].numpy()
        out = out.astype(np.float16)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp.npy")
            np.save(tmp, out)
            os.replace(tmp, path)
        return out


def look_index(cfg: se.StreamConfig, chunks: int) -> np.ndarray:
    return ((np.arange(chunks)[:, None] + 1) * cfg.chunk + np.arange(cfg.lookahead)[None]).reshape(
        -1
    )


def distill_loss(main, look, target_main, target_look):
    s = torch.cat([main.reshape(-1, main.shape[-1]), look.reshape(-1, look.shape[-1])])
    t = torch.cat([target_main, target_look])
    cos = F.cosine_similarity(s, t, dim=-1)
    nmse = ((s - t) ** 2).mean() / (t**2).mean()
    return (1 - cos).mean() + MSE_WEIGHT * nmse, float(cos.detach().mean())


# --- evaluation ------------------------------------------------------------------------
def heldout_sets(paths: list[Path]) -> dict[str, list[tuple[Path, str]]]:
    sets = {"eval": real_speech_set()}
    for p in paths:
        items = read_manifest(p)
        random.Random(0).shuffle(items)
        sets[f"{p.parent.name}/{p.stem}"] = items[:HELDOUT_PER_SET]
    return sets


class Evaluator:
    """Held-out cosine (student vs teacher) and the bundled head's CER on three encoders'
    frames. The head was trained on today's windowed frames, so its CER on student frames
    is a progress signal; the stop rule needs a head trained on student frames
    (README: "Streaming encoder")."""

    def __init__(self, teacher: Teacher, cfg: se.StreamConfig, heldout: list[Path]):
        self.teacher, self.cfg = teacher, cfg
        self.contract = teacher.contract
        self.sets = heldout_sets(heldout)
        self.head, _ = acoustic.load_head(Path(__file__).resolve().parent / "head.npz")
        self.sl = acoustic.head_slice(self.contract, self.head.cfg)
        self.width = self.contract.window_frames // self.contract.subsampling - self.sl.start
        self.baseline: dict | None = None

    def _head_text(self, x: np.ndarray, valid: np.ndarray) -> str:
        with torch.no_grad():
            lp = self.head(torch.from_numpy(x.astype(np.float32))).numpy()
        return ctc_greedy(np.concatenate([lp[i, :n] for i, n in enumerate(valid)]))

    def _teacher_head_frames(self, t: np.ndarray, n_windows: int) -> np.ndarray:
        K, hl = self.cfg.chunk, self.head.cfg.head_left
        return np.stack([t[(c + se.PAD_CHUNKS) * K - hl :][: self.width] for c in range(n_windows)])

    @torch.no_grad()
    def run(self, student: se.StreamingEncoder, with_baseline: bool = False) -> dict:
        import jiwer

        student.eval()
        cfg, K = self.cfg, self.cfg.chunk
        out: dict = {}
        refs, hyp_s, hyp_t, hyp_w = [], [], [], []
        wrap_cos, nowrap_cos = [], []
        for name, items in self.sets.items():
            cos_all = []
            for path, ref in items:
                audio = load_audio_16k(path)[: int(MAX_AUDIO_S * SAMPLE_RATE)]
                w = whole_file_windows(self.contract, audio)
                seq = student_sequence(self.contract, audio)
                C = se.sequence_chunks(cfg, len(seq))
                key = "eval-" + hashlib.sha1(f"{path}|1.0".encode()).hexdigest()[:20]
                t = self.teacher.frames(seq, key, C * K + cfg.right_features // 2).astype(
                    np.float32
                )
                mt, lt = student.forward_parallel(torch.from_numpy(seq[None]))
                main, look = mt[0].numpy(), lt[0].numpy()
                # audio frames only: from the first real chunk to the last real frame
                n_real = se.PAD_CHUNKS * K + int(w.valid_outputs.sum())
                c = se.cosine(main[se.PAD_CHUNKS * K : n_real], t[se.PAD_CHUNKS * K : n_real])
                cos_all.append(c)
                if name != "eval":
                    continue
                refs.append(acoustic.normalise_text(ref))
                hf = se.head_frames(cfg, main, look, self.head.cfg.head_left, self.width)
                hyp_s.append(self._head_text(hf, w.valid_outputs))
                if with_baseline:
                    hyp_t.append(
                        self._head_text(
                            self._teacher_head_frames(t, len(w.features)), w.valid_outputs
                        )
                    )
                    enc = self.teacher.encoder(torch.from_numpy(w.features))[:, self.sl].numpy()
                    hyp_w.append(self._head_text(enc, w.valid_outputs))
                # the same clip with a position wrap ~2 s in
                phase = cfg.period - WRAP_EVAL_LEAD_FRAMES
                mw, _ = student.forward_parallel(torch.from_numpy(seq[None]), phase=phase)
                cw = se.cosine(mw[0].numpy()[:n_real], t[:n_real])
                wc = np.repeat(se.wrap_chunks(cfg, phase, C), K)[:n_real]
                wc[: se.PAD_CHUNKS * K] = False
                wrap_cos.append(cw[wc])
                nowrap_cos.append(cw[se.PAD_CHUNKS * K :][~wc[se.PAD_CHUNKS * K :]])
            cat = np.concatenate(cos_all)
            out[f"cos:{name}"] = round(float(cat.mean()), 4)
        out["cos:eval@wrap_chunks"] = round(float(np.concatenate(wrap_cos).mean()), 4)
        out["cos:eval@other_chunks_same_run"] = round(float(np.concatenate(nowrap_cos).mean()), 4)
        out["cer:eval:head_v2_on_student"] = round(float(jiwer.cer(refs, hyp_s)), 4)
        out["wer:eval:head_v2_on_student"] = round(float(jiwer.wer(refs, hyp_s)), 4)
        if with_baseline:
            out["cer:eval:head_v2_on_teacher_full"] = round(float(jiwer.cer(refs, hyp_t)), 4)
            out["cer:eval:head_v2_on_windowed(today)"] = round(float(jiwer.cer(refs, hyp_w)), 4)
            out["cos:eval:windowed(today)_vs_teacher"] = self._windowed_cosine()
        return out

    def _windowed_cosine(self) -> float:
        """Today's windowed encoder, chunk frames vs the teacher, on the eval clips."""
        K, cs = self.cfg.chunk, []
        lo = self.contract.left_frames // self.contract.subsampling
        for path, _ in self.sets["eval"]:
            audio = load_audio_16k(path)
            w = whole_file_windows(self.contract, audio)
            seq = student_sequence(self.contract, audio)
            C = se.sequence_chunks(self.cfg, len(seq))
            key = "eval-" + hashlib.sha1(f"{path}|1.0".encode()).hexdigest()[:20]
            t = self.teacher.frames(seq, key, C * K + self.cfg.right_features // 2).astype(
                np.float32
            )
            with torch.no_grad():
                enc = self.teacher.encoder(torch.from_numpy(w.features)).numpy()
            for i, n in enumerate(w.valid_outputs):
                s = enc[i, lo : lo + n]
                tt = t[(i + se.PAD_CHUNKS) * K :][:n]
                cs.append(se.cosine(s, tt))
        return round(float(np.concatenate(cs).mean()), 4)


# --- training --------------------------------------------------------------------------
def lr_at(step: int, base: float, warmup: int, total: int) -> float:
    frac = min(1.0, step / max(1, total))
    return base * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def save_checkpoint(path: Path, **state) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m training.distill",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--data", type=parse_data, action="append", required=True, metavar="PATH[:REPEAT]"
    )
    p.add_argument("--heldout", type=Path, action="append", default=[])
    p.add_argument("--out", type=Path, default=Path("build/distill"))
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt if present")
    p.add_argument("--steps", type=int, default=20000, help="schedule length (optimiser steps)")
    p.add_argument("--stop-after", type=int, help="exit after this many steps (tests)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--batch-seconds", type=float, default=30.0, help="audio per optimiser step")
    p.add_argument("--aug", type=float, default=0.6, help="probability of noise/reverb/gain")
    p.add_argument("--left-chunks", type=int, default=se.StreamConfig.left_chunks)
    p.add_argument("--eval-every", type=int, default=250, help="0: never (smoke tests)")
    p.add_argument("--checkpoint-minutes", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-utterances", type=int, help="use only this many (smoke tests)")
    a = p.parse_args(argv)

    a.out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(message)s",
        handlers=[logging.FileHandler(a.out / "train.log"), logging.StreamHandler()],
    )
    torch.set_num_threads(a.threads)
    contract = acoustic.default_contract()
    cfg = se.StreamConfig(
        chunk=contract.output_frames,
        left_chunks=a.left_chunks,
        right_features=contract.right_frames,
    ).check()
    m = ct2.load(ct2.packaged_whisper_dir())
    teacher = Teacher(whisper.encoder_from_ct2(m), contract, a.out / "teacher")
    for q in teacher.encoder.parameters():
        q.requires_grad_(False)
    student = se.StreamingEncoder(whisper.encoder_from_ct2(m), cfg)
    for q in list(student.enc.conv1.parameters()) + list(student.enc.conv2.parameters()):
        q.requires_grad_(False)
    params = [q for q in student.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.01)

    items: list[Path] = []
    for path, rep in a.data:
        if not path.exists():
            raise SystemExit(f"--data {path}: no such manifest")
        its = [p for p, _ in read_manifest(path)]
        log.info("data %s: %d utterances x %d", path, len(its), rep)
        items += its * rep
    if a.max_utterances:
        items = items[: a.max_utterances]

    step, epoch, pos = 0, 0, 0
    rng = np.random.default_rng(a.seed)
    last = a.out / "last.pt"
    if a.resume and last.exists():
        ck = torch.load(last, weights_only=False)
        if ck["config"] != cfg.to_dict() or ck["n_items"] != len(items):
            raise SystemExit(f"{last} was made with another config or data; not resuming")
        student.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        step, epoch, pos = ck["step"], ck["epoch"], ck["pos"]
        rng.bit_generator.state = ck["np_rng"]
        random.setstate(ck["py_rng"])
        torch.set_rng_state(ck["torch_rng"])
        log.info("resumed from %s at step %d (epoch %d, item %d)", last, step, epoch, pos)
    else:
        log.info("starting from Whisper's weights; config %s", cfg.to_dict())

    evaluator = Evaluator(teacher, cfg, a.heldout)

    def checkpoint():
        save_checkpoint(
            last,
            model=student.state_dict(),
            opt=opt.state_dict(),
            step=step,
            epoch=epoch,
            pos=pos,
            np_rng=rng.bit_generator.state,
            py_rng=random.getstate(),
            torch_rng=torch.get_rng_state(),
            config=cfg.to_dict(),
            n_items=len(items),
        )
        log.info("checkpoint %s at step %d", last, step)

    def evaluate(baseline: bool):
        t0 = time.time()
        res = {"step": step, "epoch": epoch, **evaluator.run(student, with_baseline=baseline)}
        res["eval_seconds"] = round(time.time() - t0, 1)
        with open(a.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(res) + "\n")
        log.info("EVAL %s", json.dumps(res))
        torch.save(
            {"model": student.state_dict(), "config": cfg.to_dict(), "step": step},
            a.out / f"encoder_step{step}.pt",
        )

    if step == 0 and a.eval_every:
        evaluate(baseline=True)
    last_ck = time.time()
    batch_frames = int(a.batch_seconds * 50)
    losses, coss = [], []
    t_start = time.time()
    while True:
        order = np.random.default_rng(a.seed + epoch).permutation(len(items))
        while pos < len(order):
            student.train()
            for g in opt.param_groups:
                g["lr"] = lr_at(step, a.lr, a.warmup, a.steps)
            opt.zero_grad()
            frames, parts = 0, []
            while frames < batch_frames and pos < len(order):
                path = items[order[pos]]
                pos += 1
                audio = load_audio_16k(path)
                speed = float(rng.choice(SPEEDS, p=SPEED_P))
                audio = speed_change(audio, speed)[: int(MAX_AUDIO_S * SAMPLE_RATE)]
                clean = student_sequence(contract, audio)
                C = se.sequence_chunks(cfg, len(clean))
                key = hashlib.sha1(f"{path}|{speed}".encode()).hexdigest()[:20]
                t = torch.from_numpy(
                    teacher.frames(clean, key, C * cfg.chunk + cfg.right_features // 2).astype(
                        np.float32
                    )
                )
                seq = clean
                if rng.random() < a.aug:
                    seq = student_sequence(contract, augment(audio, rng))
                phase = 0 if rng.random() < 0.5 else int(rng.integers(cfg.period))
                main, look = student.forward_parallel(torch.from_numpy(seq[None]), phase=phase)
                loss, cos = distill_loss(
                    main[0], look[0], t[: C * cfg.chunk], t[look_index(cfg, C)]
                )
                n = C * cfg.chunk
                (loss * n / batch_frames).backward()
                frames += n
                parts.append((loss.item(), cos))
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            losses += [x[0] for x in parts]
            coss += [x[1] for x in parts]
            if step % 10 == 0:
                log.info(
                    "step %d epoch %d item %d/%d loss %.4f cos %.4f lr %.2e (%.1f s/step)",
                    step,
                    epoch,
                    pos,
                    len(order),
                    np.mean(losses),
                    np.mean(coss),
                    opt.param_groups[0]["lr"],
                    (time.time() - t_start) / 10,
                )
                losses, coss, t_start = [], [], time.time()
            if time.time() - last_ck > a.checkpoint_minutes * 60:
                checkpoint()
                last_ck = time.time()
            if a.eval_every and step % a.eval_every == 0:
                evaluate(baseline=False)
            if a.stop_after and step >= a.stop_after:
                checkpoint()
                return 0
            if step >= a.steps:
                checkpoint()
                if a.eval_every:
                    evaluate(baseline=False)
                return 0
        epoch += 1
        pos = 0


if __name__ == "__main__":
    raise SystemExit(main())
