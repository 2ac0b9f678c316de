"""Train the streaming CTC head on the frozen, windowed Whisper encoder.

    nice -n 10 python -m training.train_ctc --manifest build/data/manifest.jsonl

1. ``precompute``: every training utterance is cut into exactly the serving windows
   (``streamasr.core.features.whole_file_windows``), run once through the frozen encoder, and the
   frames the head reads are cached in fp16 under ``build/ctc_cache/``.
2. ``train``: the head runs on each window on its own (as in serving); the chunk outputs of
   an utterance's windows are concatenated and trained with CTC against its text.
3. ``evaluate``: WER on real speech (Debian pocketsphinx test clips, never trained on),
   streaming windows, greedy CTC.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from torch.nn import functional as F

from streamasr.artifacts import acoustic, ct2, whisper
from streamasr.core.features import whole_file_windows
from streamasr.protocol.contract import ModelContract

log = logging.getLogger("training.train_ctc")
ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "build" / "ctc_cache"
HEAD_FILE = acoustic.HEAD_FILE


# --- data ------------------------------------------------------------------------------
def read_manifest(path: Path) -> list[tuple[Path, str]]:
    """JSON lines with an audio path (key audio/path/wav, relative to the manifest) and
    its text (key text/transcript)."""
    items = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        d = json.loads(line)
        audio = next(d[k] for k in ("audio", "path", "wav", "audio_path") if k in d)
        text = next(d[k] for k in ("text", "transcript", "sentence") if k in d)
        p = Path(audio)
        if not p.is_absolute():
            p = (path.parent / p) if (path.parent / p).exists() else (ROOT / p)
        items.append((p, text))
    return items


def load_audio_16k(path: Path) -> np.ndarray:
    from scipy.signal import resample_poly

    a, sr = sf.read(str(path), dtype="float32", always_2d=True)
    a = a.mean(axis=1)
    if sr != 16000:
        g = math.gcd(sr, 16000)
        a = resample_poly(a, 16000 // g, sr // g).astype(np.float32)
    return a


def augment(audio: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gain, optional synthetic room reverb, optional coloured noise at 5-30 dB SNR."""
    a = audio.astype(np.float32)
    if rng.random() < 0.4:  # exponentially decaying noise tail as a room response
        rt = rng.uniform(0.1, 0.5)
        n = int(rt * 16000)
        ir = rng.standard_normal(n) * np.exp(-6.9 * np.arange(n) / n)
        ir[0] = 1.0
        ir /= np.sqrt((ir**2).sum())
        from scipy.signal import fftconvolve

        a = fftconvolve(a, ir)[: len(a)].astype(np.float32)
    if rng.random() < 0.6:
        noise = rng.standard_normal(len(a)).astype(np.float32)
        if rng.random() < 0.5:  # brown-ish noise
            noise = np.cumsum(noise)
            noise -= np.convolve(noise, np.ones(400) / 400, mode="same")
        snr = rng.uniform(5, 30)
        p_sig = float((a**2).mean()) + 1e-9
        p_n = float((noise**2).mean()) + 1e-9
        a = a + noise * math.sqrt(p_sig / p_n / 10 ** (snr / 10))
    peak = float(np.abs(a).max()) + 1e-9
    return (a / peak * rng.uniform(0.1, 0.9)).astype(np.float32)


@dataclass
class Cache:
    frames: np.ndarray  # [N_windows, n, 384] fp16 (memmap)
    win_start: np.ndarray  # [U] first window of each utterance
    win_count: np.ndarray  # [U]
    out_frames: np.ndarray  # [U] valid output frames
    targets: list[list[int]]
    texts: list[str]


FRAME_MODES = ("window", "full")
# Full-context mode pads short utterances to 10 s: the Whisper encoder gives its 30-s-window
# result from 10 s of input on (measured for the re-decoder, ../shared notes), at a third
# of the cost.
FULL_CONTEXT_MIN_FRAMES = 1000


def _cache_key(
    items, contract: ModelContract, cfg: acoustic.HeadConfig, copies: int, frames: str = "window"
) -> str:
    h = hashlib.sha1()
    h.update(contract.to_json().encode())
    h.update(str((cfg.head_left, copies)).encode())
    if frames != "window":
        h.update(frames.encode())
    for p, t in items:
        h.update(f"{p}\t{t}\n".encode())
    return h.hexdigest()[:16]


def onnx_encoder(encoder, contract: ModelContract, threads: int = 2):
    """The frozen encoder as an onnxruntime function [N, W, F] -> [N, W/2, d] (faster than
    torch eager on these CPUs); the same graph as in the exported model."""
    import onnxruntime as ort

    path = CACHE / f"encoder_{contract.window_frames}.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        x = torch.zeros(1, contract.window_frames, contract.features.n_mels)
        with torch.no_grad():
            torch.onnx.export(
                encoder.eval(),
                (x,),
                str(path),
                dynamo=False,
                opset_version=17,
                input_names=["features"],
                output_names=["enc"],
                dynamic_axes={"features": {0: "batch"}, "enc": {0: "batch"}},
            )
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return lambda feats: sess.run(["enc"], {"features": feats.astype(np.float32)})[0]


def full_sequence(contract: ModelContract, window_features: np.ndarray) -> np.ndarray:
    """The feature frames the windows were cut from (window 0 from its first frame, then
    each later window's chunk, then the last window's look-ahead)."""
    lc = contract.left_frames + contract.chunk_frames
    parts = [window_features[0, :lc]]
    parts += [w[contract.left_frames : lc] for w in window_features[1:]]
    parts.append(window_features[-1, lc:])
    return np.concatenate(parts)


def full_context_frames(
    encode_full, contract: ModelContract, cfg: acoustic.HeadConfig, window_features: np.ndarray
) -> np.ndarray:
    """For each window, the frames the head reads, taken from ONE encoder pass over the
    whole utterance (non-streaming: every frame sees the whole utterance)."""
    seq = full_sequence(contract, window_features)
    n = len(seq)
    if n < FULL_CONTEXT_MIN_FRAMES:  # pad with the stream-start padding frame
        seq = np.concatenate(
            [seq, np.repeat(window_features[:1, 0], FULL_CONTEXT_MIN_FRAMES - n, axis=0)]
        )
    enc = encode_full(seq[None].astype(np.float32))[0]
    sl = acoustic.head_slice(contract, cfg)
    width = contract.window_frames // contract.subsampling - sl.start
    step = contract.chunk_frames // contract.subsampling
    return np.stack(
        [
            enc[sl.start + i * step : sl.start + i * step + width]
            for i in range(len(window_features))
        ]
    )


def torch_full_encoder(encoder):
    def run(feats: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return encoder(torch.from_numpy(feats)).numpy()

    return run


def precompute(
    items,
    contract: ModelContract,
    encoder,
    cfg: acoustic.HeadConfig,
    copies: int = 1,
    seed: int = 0,
    frames: str = "window",
    encode_full=None,
) -> Cache:
    """Encoder outputs of every window of every (augmented copy of an) utterance:
    ``frames="window"`` as served (each window encoded on its own), ``"full"`` from one
    whole-utterance encode (``encode_full``), the non-streaming upper bound."""
    if frames not in FRAME_MODES:
        raise ValueError(f"frames must be one of {FRAME_MODES}, not {frames!r}")
    key = _cache_key(items, contract, cfg, copies, frames)
    d = CACHE / key
    sl = acoustic.head_slice(contract, cfg)
    if (d / "done").exists():
        log.info("using cached encoder outputs %s", d)
    else:
        d.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(seed)
        meta, seen = [], set()
        t0, total_w = time.time(), 0
        f = open(d / "frames.bin", "wb")
        for copy in range(copies):
            for path, text in items:
                tgt = acoustic.encode_text(text)
                if not tgt:
                    continue
                audio = load_audio_16k(path)
                if copy > 0 or path in seen or rng.random() < 0.3:  # repeats: new variants
                    audio = augment(audio, rng)
                seen.add(path)
                w = whole_file_windows(contract, audio)
                if frames == "full":
                    enc = full_context_frames(encode_full, contract, cfg, w.features).astype(
                        np.float16
                    )
                else:
                    enc = encoder(w.features)[:, sl].astype(np.float16)
                f.write(enc.tobytes())
                meta.append(
                    {
                        "start": total_w,
                        "count": len(enc),
                        "out": int(w.valid_outputs.sum()),
                        "text": text,
                        "target": tgt,
                    }
                )
                total_w += len(enc)
                if len(meta) % 200 == 0:
                    log.info(
                        "precompute %d utterances, %d windows, %.0f s",
                        len(meta),
                        total_w,
                        time.time() - t0,
                    )
        f.close()
        shape = [total_w, *enc.shape[1:]]
        (d / "meta.json").write_text(json.dumps({"shape": shape, "utts": meta}))
        (d / "done").write_text("ok")
        log.info("precomputed %d windows in %.0f s", total_w, time.time() - t0)
    m = json.loads((d / "meta.json").read_text())
    frames = np.memmap(d / "frames.bin", dtype=np.float16, mode="r", shape=tuple(m["shape"]))
    u = m["utts"]
    return Cache(
        frames,
        np.array([x["start"] for x in u]),
        np.array([x["count"] for x in u]),
        np.array([x["out"] for x in u]),
        [x["target"] for x in u],
        [x["text"] for x in u],
    )


class Corpus:
    """The utterances of several caches (one per data source) as one indexed list."""

    def __init__(self, caches: list[Cache]):
        self.caches = caches
        self.index = [(c, i) for c in caches for i in range(len(c.targets))]
        self.win_count = np.array([c.win_count[i] for c, i in self.index])
        self.out_frames = np.array([c.out_frames[i] for c, i in self.index])
        self.targets = [c.targets[i] for c, i in self.index]

    def windows(self, j: int) -> np.ndarray:
        c, i = self.index[j]
        return c.frames[c.win_start[i] : c.win_start[i] + c.win_count[i]]

    @property
    def n_windows(self) -> int:
        return int(self.win_count.sum())


# --- training --------------------------------------------------------------------------
def _batch_loss(head, cache: Corpus, idx, time_mask: bool) -> torch.Tensor:
    x = torch.from_numpy(
        np.concatenate([np.asarray(cache.windows(i), dtype=np.float32) for i in idx])
    )
    if time_mask:  # SpecAugment-like masking on encoder frames + channel dropout
        x = F.dropout(x, 0.1)
        for j in range(len(x)):
            if random.random() < 0.3:
                s = random.randrange(x.shape[1])
                x[j, s : s + random.randint(1, 4)] = 0
    lp = head(x)  # [Nw, chunk_out, V]
    per, pos = [], 0
    for i in idx:
        n = cache.win_count[i]
        per.append(lp[pos : pos + n].reshape(-1, lp.shape[-1])[: cache.out_frames[i]])
        pos += n
    lens = torch.tensor([len(p) for p in per])
    padded = torch.nn.utils.rnn.pad_sequence(per)  # [T, B, V]
    tg = [torch.tensor(cache.targets[i]) for i in idx]
    tlens = torch.tensor([len(t) for t in tg])
    return F.ctc_loss(
        padded, torch.cat(tg), lens, tlens, blank=0, reduction="mean", zero_infinity=True
    )


def train(
    head,
    cache: Corpus,
    dev: Corpus | None,
    minutes: float | None = None,
    lr: float = 1e-3,
    batch_windows: int = 160,
    seed: int = 0,
    steps: int | None = None,
) -> dict:
    """AdamW with warm-up and cosine decay over the budget: ``steps`` optimiser steps
    (reproducible, what the ablation uses) or else ``minutes`` of wall-clock time."""
    if (steps is None) == (minutes is None):
        raise ValueError("give exactly one budget: steps or minutes")
    random.seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.01)
    order = list(range(len(cache.targets)))
    t0 = time.time()
    deadline = t0 + minutes * 60 if minutes is not None else math.inf
    step, epoch, hist = 0, 0, []
    warm = 200

    def done() -> bool:
        return step >= steps if steps is not None else time.time() >= deadline

    def progress() -> float:
        if steps is not None:
            return min(1.0, step / steps)
        return min(1.0, (time.time() - t0) / (minutes * 60))

    while not done():
        random.shuffle(order)
        batches, cur, nw = [], [], 0
        for i in order:
            cur.append(i)
            nw += cache.win_count[i]
            if nw >= batch_windows:
                batches.append(cur)
                cur, nw = [], 0
        if cur and not batches:  # a corpus smaller than one batch still trains
            batches.append(cur)
        head.train()
        losses = []
        for b in batches:
            if done():
                break
            frac = progress()
            for g in opt.param_groups:  # warm-up then cosine decay over the time budget
                g["lr"] = (
                    lr
                    * min(1.0, (step + 1) / warm)
                    * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
                )
            loss = _batch_loss(head, cache, b, time_mask=True)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), 5.0)
            opt.step()
            losses.append(loss.item())
            step += 1
            if step % 50 == 0:
                log.info(
                    "step %d epoch %d loss %.3f (%.1f min)",
                    step,
                    epoch,
                    np.mean(losses[-50:]),
                    (time.time() - t0) / 60,
                )
        epoch += 1
        entry = {"epoch": epoch, "step": step, "train_loss": float(np.mean(losses or [0]))}
        if dev is not None:
            head.eval()
            with torch.no_grad():
                dl = [
                    float(
                        _batch_loss(head, dev, list(range(k, min(k + 8, len(dev.targets)))), False)
                    )
                    for k in range(0, len(dev.targets), 8)
                ]
            entry["dev_loss"] = float(np.mean(dl))
        hist.append(entry)
        log.info("epoch %s", entry)
    head.eval()
    return {"steps": step, "epochs": epoch, "minutes": (time.time() - t0) / 60, "history": hist}


# --- evaluation on real speech ---------------------------------------------------------
def real_speech_set() -> list[tuple[Path, str]]:
    """(wav, reference) of the bundled real-speech evaluation set (assets/eval: the
    pocketsphinx-testdata clips + JFK), so evaluation needs no Debian package."""
    from streamasr.core.evaluation import load_eval_set

    return [(item.audio_path, item.reference) for item in load_eval_set()]


def ctc_greedy(log_probs: np.ndarray) -> str:
    ids = log_probs.argmax(-1)
    out, prev = [], -1
    for i in ids:
        if i != prev and i != 0:
            out.append(acoustic.VOCABULARY[i])
        prev = i
    return " ".join("".join(out).split())


def transcribe(run_windows, contract: ModelContract, audio: np.ndarray) -> str:
    """run_windows: [N, W, F] float32 -> [N, chunk_out, V]; streaming windows, greedy CTC."""
    w = whole_file_windows(contract, audio)
    lp = run_windows(w.features).reshape(-1, len(contract.vocabulary))
    return ctc_greedy(lp[: int(w.valid_outputs.sum())])


def evaluate(run_windows, contract: ModelContract, items=None) -> dict:
    import jiwer

    items = items if items is not None else real_speech_set()
    refs, hyps, rows = [], [], []
    for wav, ref in items:
        hyp = transcribe(run_windows, contract, load_audio_16k(wav))
        r = acoustic.normalise_text(ref)
        refs.append(r)
        hyps.append(hyp)
        rows.append({"file": wav.name, "ref": r, "hyp": hyp})
    return {
        "wer": float(jiwer.wer(refs, hyps)),
        "cer": float(jiwer.cer(refs, hyps)),
        "clips": len(items),
        "words": sum(len(r.split()) for r in refs),
        "rows": rows,
    }


def torch_runner(model: acoustic.AcousticModel):
    def run(feats: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(feats)).numpy()

    return run


def full_context_runner(encoder, head: acoustic.CTCHead, contract: ModelContract):
    """Windows [N, W, F] -> log-probs from full-context encoder frames (ablation only)."""
    encode_full = torch_full_encoder(encoder)

    def run(feats: np.ndarray) -> np.ndarray:
        x = full_context_frames(encode_full, contract, head.cfg, feats)
        with torch.no_grad():
            return head(torch.from_numpy(x.astype(np.float32))).numpy()

    return run


# --- command line ----------------------------------------------------------------------
def evaluate_heldout(run_windows, contract: ModelContract, manifest: Path) -> dict:
    """Greedy-CTC WER/CER on held-out utterances, overall and per engine / voice."""
    rows = [json.loads(x) for x in manifest.read_text().splitlines() if x.strip()]
    by_engine: dict[str, list] = {}
    for r in rows:
        by_engine.setdefault(r["voice"].split(":")[0], []).append(
            (manifest.parent / r["audio"], r["text"])
        )
    out = {
        eng: {k: v for k, v in evaluate(run_windows, contract, items).items() if k != "rows"}
        for eng, items in sorted(by_engine.items())
    }
    if len(by_engine) > 1:
        out["all"] = {
            k: v
            for k, v in evaluate(
                run_windows, contract, [it for items in by_engine.values() for it in items]
            ).items()
            if k != "rows"
        }
    return out


def evaluate_real(run_windows, contract: ModelContract) -> dict:
    """assets/eval without JFK (its sentence is in the CMU LM's text) and JFK alone."""
    import jiwer

    everything = evaluate(run_windows, contract, real_speech_set())  # each clip decoded once
    out = {"all": everything}
    for name, keep in (("eval", lambda f: f != "jfk.wav"), ("jfk", lambda f: f == "jfk.wav")):
        rows = [r for r in everything["rows"] if keep(r["file"])]
        if rows:
            refs, hyps = [r["ref"] for r in rows], [r["hyp"] for r in rows]
            out[name] = {
                "wer": float(jiwer.wer(refs, hyps)),
                "cer": float(jiwer.cer(refs, hyps)),
                "clips": len(rows),
                "words": sum(len(r.split()) for r in refs),
                "rows": rows,
            }
    return out


def audio_hours(items) -> float:
    return sum(sf.info(str(p)).duration for p, _ in items) / 3600


def parse_real(spec: str) -> tuple[Path, int]:
    """``PATH[:REPEAT]`` -> (manifest, times it is trained on)."""
    path, _, rep = spec.partition(":")
    return Path(path), int(rep) if rep else 1


def train_head(
    manifest: Path,
    minutes: float | None = 25.0,
    copies: int = 1,
    lr: float = 1e-3,
    dev_fraction: float = 0.03,
    out: Path = HEAD_FILE,
    max_utterances: int | None = None,
    init: Path | None = None,
    real: list[tuple[Path, int]] = (),
    heldout: list[Path] = (),
    steps: int | None = None,
    frames: str = "window",
):
    """The whole recipe: precompute -> train -> evaluate on real speech (and held-out
    sets) -> save the head.  Each ``real`` manifest (real speech: Whisper-pseudo-labelled,
    or transcribed prompts) is trained on REPEAT times, every repeat after the first
    augmented; the dev set is synthetic only so no real piece is both trained on and used
    for model selection.  Each source is cached on its own, so adding a source re-encodes
    only that source."""
    contract = acoustic.default_contract()
    cfg = acoustic.HeadConfig()
    encoder = whisper.encoder_from_ct2(ct2.load(ct2.packaged_whisper_dir()))
    items = read_manifest(manifest)
    random.Random(0).shuffle(items)
    if max_utterances:
        items = items[:max_utterances]
    run_encoder = onnx_encoder(encoder, contract)
    encode_full = torch_full_encoder(encoder) if frames == "full" else None
    n_dev = max(1, int(len(items) * dev_fraction))
    train_items = items[n_dev:]
    rows = [json.loads(x) for x in manifest.read_text().splitlines() if x.strip()]
    voices = {r["audio"]: r["voice"].split(":")[0] for r in rows}  # engine per file
    hours: dict[str, float] = {}
    for eng in sorted(set(voices.values())):
        hours[eng] = audio_hours([it for it in train_items if voices.get(it[0].name) == eng])
    t0 = time.time()

    def cached(its, copies_, seed):
        return precompute(
            its,
            contract,
            run_encoder,
            cfg,
            copies=copies_,
            seed=seed,
            frames=frames,
            encode_full=encode_full,
        )

    dev = Corpus([cached(items[:n_dev], 1, 1)])
    caches = [cached(train_items, copies, 0)]
    for path, repeat in real:
        its = read_manifest(path)
        hours[f"real:{path.parent.name}/{path.stem}"] = audio_hours(its)
        hours[f"real:{path.parent.name}/{path.stem}:repeat"] = repeat
        caches.append(cached(its * repeat, 1, 0))
    log.info("training audio hours per source (before repeats): %s", hours)
    tr = Corpus(caches)
    pre_min = (time.time() - t0) / 60
    log.info(
        "train: %d utterances / %d windows; dev %d; precompute %.1f min",
        len(tr.targets),
        tr.n_windows,
        len(dev.targets),
        pre_min,
    )

    head = acoustic.CTCHead(cfg, contract.output_frames)
    before = {}
    if init is not None:  # continue from an earlier head (same cache, more epochs)
        old, before = acoustic.load_head(init)
        head.load_state_dict(old.state_dict())
        log.info("continuing from %s", init)
    info = train(head, tr, dev, minutes, lr=lr, steps=steps)
    if before:
        info["continued_from"] = before.get("train")
    if frames == "full":
        runner = full_context_runner(encoder, head, contract)
    else:
        runner = torch_runner(acoustic.AcousticModel(encoder, head, contract).eval())
    res = evaluate_real(runner, contract)
    for r in res["all"]["rows"]:
        log.info("%s\n  REF: %s\n  HYP: %s", r["file"], r["ref"], r["hyp"])
    for name, r in res.items():
        log.info(
            "REAL SPEECH %s (%d clips, %d words): WER %.1f %%  CER %.1f %%",
            name,
            r["clips"],
            r["words"],
            100 * r["wer"],
            100 * r["cer"],
        )
    meta = {
        "train": {
            **info,
            "precompute_minutes": pre_min,
            "utterances": len(tr.targets),
            "windows": tr.n_windows,
            "manifest": str(manifest),
            "max_utterances": max_utterances,
            "hours": hours,
            "copies": copies,
            "frames": frames,
            "budget_steps": steps,
        },
        "real_speech": {k: res["all"][k] for k in ("wer", "cer", "clips", "words")},
        "real_speech_sets": {
            n: {k: r[k] for k in ("wer", "cer", "clips", "words")} for n, r in res.items()
        },
    }
    for path in heldout:
        if path.exists():
            name = f"heldout:{path.parent.name}/{path.stem}"
            meta.setdefault("heldout", {})[name] = evaluate_heldout(runner, contract, path)
            for eng, r in meta["heldout"][name].items():
                log.info(
                    "HELD-OUT %s %s (%d utts, %d words): WER %.1f %%  CER %.1f %%",
                    name,
                    eng,
                    r["clips"],
                    r["words"],
                    100 * r["wer"],
                    100 * r["cer"],
                )
    acoustic.save_head(head, out, **meta)
    log.info("saved %s", out)
    return head, meta


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m training.train_ctc",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--manifest", type=Path, required=True)
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, help="training wall-clock budget")
    budget.add_argument("--steps", type=int, help="training budget in optimiser steps")
    p.add_argument("--copies", type=int, default=1, help="augmented copies of the data")
    p.add_argument("--dev-fraction", type=float, default=0.03)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=HEAD_FILE)
    p.add_argument("--max-utterances", type=int, help="use only this many of the manifest")
    p.add_argument("--init", type=Path, help="continue training this head (.npz)")
    p.add_argument(
        "--real",
        type=parse_real,
        action="append",
        default=[],
        metavar="PATH[:REPEAT]",
        help="real-speech manifest and how often it is trained on (repeatable)",
    )
    p.add_argument(
        "--heldout",
        type=Path,
        action="append",
        default=[],
        help="held-out manifest, scored after training (repeatable)",
    )
    p.add_argument(
        "--frames",
        choices=FRAME_MODES,
        default="window",
        help="encoder frames the head reads: as served, or full-context (ablation)",
    )
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(a.threads)
    minutes = a.minutes if a.minutes is not None or a.steps is not None else 25.0
    train_head(
        a.manifest,
        minutes if a.steps is None else None,
        a.copies,
        a.lr,
        a.dev_fraction,
        a.out,
        a.max_utterances,
        a.init,
        a.real,
        a.heldout,
        a.steps,
        a.frames,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
