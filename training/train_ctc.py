"""Train the streaming CTC head on the frozen, windowed Whisper encoder.

    nice -n 10 python -m training.train_ctc --manifest build/data/manifest.jsonl

1. ``precompute``: every training utterance is cut into exactly the serving windows
   (``streamasr.features.whole_file_windows``), run once through the frozen encoder, and the
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
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from torch.nn import functional as F

from streamasr.contract import ModelContract
from streamasr.features import whole_file_windows

from . import acoustic, ct2, whisper

log = logging.getLogger("training.train_ctc")
ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "build" / "ctc_cache"
HEAD_FILE = Path(__file__).resolve().parent / "head.npz"


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
    if rng.random() < 0.4:   # exponentially decaying noise tail as a room response
        rt = rng.uniform(0.1, 0.5)
        n = int(rt * 16000)
        ir = rng.standard_normal(n) * np.exp(-6.9 * np.arange(n) / n)
        ir[0] = 1.0
        ir /= np.sqrt((ir ** 2).sum())
        from scipy.signal import fftconvolve
        a = fftconvolve(a, ir)[: len(a)].astype(np.float32)
    if rng.random() < 0.6:
        noise = rng.standard_normal(len(a)).astype(np.float32)
        if rng.random() < 0.5:   # brown-ish noise
            noise = np.cumsum(noise)
            noise -= np.convolve(noise, np.ones(400) / 400, mode="same")
        snr = rng.uniform(5, 30)
        p_sig = float((a ** 2).mean()) + 1e-9
        p_n = float((noise ** 2).mean()) + 1e-9
        a = a + noise * math.sqrt(p_sig / p_n / 10 ** (snr / 10))
    peak = float(np.abs(a).max()) + 1e-9
    return (a / peak * rng.uniform(0.1, 0.9)).astype(np.float32)


@dataclass
class Cache:
    frames: np.ndarray     # [N_windows, n, 384] fp16 (memmap)
    win_start: np.ndarray  # [U] first window of each utterance
    win_count: np.ndarray  # [U]
    out_frames: np.ndarray # [U] valid output frames
    targets: list[list[int]]
    texts: list[str]


def _cache_key(items, contract: ModelContract, cfg: acoustic.HeadConfig, copies: int) -> str:
    h = hashlib.sha1()
    h.update(contract.to_json().encode())
    h.update(str((cfg.head_left, copies)).encode())
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
            torch.onnx.export(encoder.eval(), (x,), str(path), dynamo=False, opset_version=17,
                              input_names=["features"], output_names=["enc"],
                              dynamic_axes={"features": {0: "batch"}, "enc": {0: "batch"}})
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return lambda feats: sess.run(["enc"], {"features": feats.astype(np.float32)})[0]


def precompute(items, contract: ModelContract, encoder, cfg: acoustic.HeadConfig,
               copies: int = 1, seed: int = 0) -> Cache:
    """Encoder outputs of every window of every (augmented copy of an) utterance."""
    key = _cache_key(items, contract, cfg, copies)
    d = CACHE / key
    sl = acoustic.head_slice(contract, cfg)
    if (d / "done").exists():
        log.info("using cached encoder outputs %s", d)
    else:
        d.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(seed)
        chunks, meta, seen = [], [], set()
        t0, total_w = time.time(), 0
        f = open(d / "frames.bin", "wb")
        for copy in range(copies):
            for i, (path, text) in enumerate(items):
                tgt = acoustic.encode_text(text)
                if not tgt:
                    continue
                audio = load_audio_16k(path)
                if copy > 0 or path in seen or rng.random() < 0.3:   # repeats: new variants
                    audio = augment(audio, rng)
                seen.add(path)
                w = whole_file_windows(contract, audio)
                enc = encoder(w.features)[:, sl].astype(np.float16)
                f.write(enc.tobytes())
                meta.append({"start": total_w, "count": len(enc),
                             "out": int(w.valid_outputs.sum()), "text": text, "target": tgt})
                total_w += len(enc)
                if len(meta) % 200 == 0:
                    log.info("precompute %d utterances, %d windows, %.0f s", len(meta),
                             total_w, time.time() - t0)
        f.close()
        shape = [total_w, *enc.shape[1:]]
        (d / "meta.json").write_text(json.dumps({"shape": shape, "utts": meta}))
        (d / "done").write_text("ok")
        log.info("precomputed %d windows in %.0f s", total_w, time.time() - t0)
    m = json.loads((d / "meta.json").read_text())
    frames = np.memmap(d / "frames.bin", dtype=np.float16, mode="r", shape=tuple(m["shape"]))
    u = m["utts"]
    return Cache(frames, np.array([x["start"] for x in u]), np.array([x["count"] for x in u]),
                 np.array([x["out"] for x in u]), [x["target"] for x in u],
                 [x["text"] for x in u])


# --- training --------------------------------------------------------------------------
def _batch_loss(head, cache: Cache, idx, time_mask: bool) -> torch.Tensor:
    wins = np.concatenate([np.arange(cache.win_start[i], cache.win_start[i] + cache.win_count[i])
                           for i in idx])
    x = torch.from_numpy(np.asarray(cache.frames[wins], dtype=np.float32))
    if time_mask:   # SpecAugment-like masking on encoder frames + channel dropout
        x = F.dropout(x, 0.1)
        for j in range(len(x)):
            if random.random() < 0.3:
                s = random.randrange(x.shape[1])
                x[j, s: s + random.randint(1, 4)] = 0
    lp = head(x)                                              # [Nw, chunk_out, V]
    per, pos = [], 0
    for i in idx:
        n = cache.win_count[i]
        per.append(lp[pos: pos + n].reshape(-1, lp.shape[-1])[: cache.out_frames[i]])
        pos += n
    lens = torch.tensor([len(p) for p in per])
    padded = torch.nn.utils.rnn.pad_sequence(per)             # [T, B, V]
    tg = [torch.tensor(cache.targets[i]) for i in idx]
    tlens = torch.tensor([len(t) for t in tg])
    return F.ctc_loss(padded, torch.cat(tg), lens, tlens, blank=0, reduction="mean",
                      zero_infinity=True)


def train(head, cache: Cache, dev: Cache | None, minutes: float, lr: float = 1e-3,
          batch_windows: int = 160, seed: int = 0) -> dict:
    random.seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.01)
    order = list(range(len(cache.targets)))
    t0 = time.time()
    deadline = t0 + minutes * 60
    step, epoch, hist = 0, 0, []
    warm = 200
    while time.time() < deadline:
        random.shuffle(order)
        batches, cur, nw = [], [], 0
        for i in order:
            cur.append(i)
            nw += cache.win_count[i]
            if nw >= batch_windows:
                batches.append(cur)
                cur, nw = [], 0
        head.train()
        losses = []
        for b in batches:
            if time.time() >= deadline:
                break
            frac = min(1.0, (time.time() - t0) / (minutes * 60))
            for g in opt.param_groups:   # warm-up then cosine decay over the time budget
                g["lr"] = lr * min(1.0, (step + 1) / warm) * (0.05 + 0.95 * 0.5 *
                                                               (1 + math.cos(math.pi * frac)))
            loss = _batch_loss(head, cache, b, time_mask=True)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), 5.0)
            opt.step()
            losses.append(loss.item())
            step += 1
            if step % 50 == 0:
                log.info("step %d epoch %d loss %.3f (%.1f min)", step, epoch,
                         np.mean(losses[-50:]), (time.time() - t0) / 60)
        epoch += 1
        entry = {"epoch": epoch, "step": step, "train_loss": float(np.mean(losses or [0]))}
        if dev is not None:
            head.eval()
            with torch.no_grad():
                dl = [float(_batch_loss(head, dev, list(range(k, min(k + 8, len(dev.targets)))),
                                        False)) for k in range(0, len(dev.targets), 8)]
            entry["dev_loss"] = float(np.mean(dl))
        hist.append(entry)
        log.info("epoch %s", entry)
    head.eval()
    return {"steps": step, "epochs": epoch, "minutes": (time.time() - t0) / 60, "history": hist}


# --- evaluation on real speech ---------------------------------------------------------
def real_speech_set() -> list[tuple[Path, str]]:
    """(wav, reference) of the bundled real-speech evaluation set (assets/eval: the
    pocketsphinx-testdata clips + JFK), so evaluation needs no Debian package."""
    from streamasr.evaluation import load_eval_set

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
    return {"wer": float(jiwer.wer(refs, hyps)), "cer": float(jiwer.cer(refs, hyps)),
            "clips": len(items), "words": sum(len(r.split()) for r in refs), "rows": rows}


def torch_runner(model: acoustic.AcousticModel):
    def run(feats: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(feats)).numpy()
    return run


# --- command line ----------------------------------------------------------------------
def evaluate_heldout(run_windows, contract: ModelContract, manifest: Path) -> dict:
    """Greedy-CTC WER/CER on held-out synthetic utterances, overall and per engine."""
    rows = [json.loads(x) for x in manifest.read_text().splitlines() if x.strip()]
    by_engine: dict[str, list] = {}
    for r in rows:
        by_engine.setdefault(r["voice"].split(":")[0], []).append(
            (manifest.parent / r["audio"], r["text"]))
    out = {eng: {k: v for k, v in evaluate(run_windows, contract, items).items() if k != "rows"}
           for eng, items in sorted(by_engine.items())}
    out["all"] = {k: v for k, v in evaluate(run_windows, contract, [
        it for items in by_engine.values() for it in items]).items() if k != "rows"}
    return out


def audio_hours(items) -> float:
    return sum(sf.info(str(p)).duration for p, _ in items) / 3600


def train_head(manifest: Path, minutes: float = 25.0, copies: int = 1, lr: float = 1e-3,
               dev_fraction: float = 0.03, out: Path = HEAD_FILE,
               max_utterances: int | None = None, init: Path | None = None,
               real_manifest: Path | None = None, real_repeat: int = 20,
               heldout: Path | None = None):
    """The whole recipe: precompute -> train -> evaluate on real speech (and held-out
    synthetic speech) -> save the head.  ``real_manifest`` (pseudo-labelled real speech) is
    trained on ``real_repeat`` times, every repeat after the first augmented; the dev set is
    synthetic only so no real piece is both trained on and used for model selection."""
    contract = acoustic.default_contract()
    cfg = acoustic.HeadConfig()
    encoder = whisper.encoder_from_ct2(ct2.load(ct2.packaged_whisper_dir()))
    items = read_manifest(manifest)
    random.Random(0).shuffle(items)
    if max_utterances:
        items = items[:max_utterances]
    run_encoder = onnx_encoder(encoder, contract)
    n_dev = max(1, int(len(items) * dev_fraction))
    train_items = items[n_dev:]
    rows = [json.loads(x) for x in manifest.read_text().splitlines() if x.strip()]
    voices = {r["audio"]: r["voice"].split(":")[0] for r in rows}   # engine per file
    hours: dict[str, float] = {}
    for eng in sorted(set(voices.values())):
        hours[eng] = audio_hours([it for it in train_items if voices.get(it[0].name) == eng])
    if real_manifest is not None:
        real = read_manifest(real_manifest)
        hours["real_pseudo_labelled"] = audio_hours(real)
        hours["real_repeat"] = real_repeat
        train_items = train_items + real * real_repeat
        random.Random(1).shuffle(train_items)
    log.info("training audio hours per source (before repeats): %s", hours)
    t0 = time.time()
    dev = precompute(items[:n_dev], contract, run_encoder, cfg, copies=1, seed=1)
    tr = precompute(train_items, contract, run_encoder, cfg, copies=copies, seed=0)
    pre_min = (time.time() - t0) / 60
    log.info("train: %d utterances / %d windows; dev %d; precompute %.1f min",
             len(tr.targets), len(tr.frames), len(dev.targets), pre_min)

    head = acoustic.CTCHead(cfg, contract.output_frames)
    before = {}
    if init is not None:   # continue from an earlier head (same cache, more epochs)
        old, before = acoustic.load_head(init)
        head.load_state_dict(old.state_dict())
        log.info("continuing from %s", init)
    info = train(head, tr, dev, minutes, lr=lr)
    if before:
        info["continued_from"] = before.get("train")
    model = acoustic.AcousticModel(encoder, head, contract).eval()
    res = evaluate(torch_runner(model), contract)
    for r in res["rows"]:
        log.info("%s\n  REF: %s\n  HYP: %s", r["file"], r["ref"], r["hyp"])
    log.info("REAL SPEECH (%d clips, %d words): WER %.1f %%  CER %.1f %%", res["clips"],
             res["words"], 100 * res["wer"], 100 * res["cer"])
    meta = {"train": {**info, "precompute_minutes": pre_min, "utterances": len(tr.targets),
                      "windows": int(len(tr.frames)), "manifest": str(manifest),
                      "max_utterances": max_utterances, "hours": hours,
                      "copies": copies},
            "real_speech": {k: res[k] for k in ("wer", "cer", "clips", "words")}}
    if heldout is not None and heldout.exists():
        meta["heldout_synthetic"] = evaluate_heldout(torch_runner(model), contract, heldout)
        for eng, r in meta["heldout_synthetic"].items():
            log.info("HELD-OUT SYNTHETIC %s (%d utts, %d words): WER %.1f %%  CER %.1f %%",
                     eng, r["clips"], r["words"], 100 * r["wer"], 100 * r["cer"])
    acoustic.save_head(head, out, **meta)
    log.info("saved %s", out)
    return head, meta


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.train_ctc", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", type=Path, required=True)
    p.add_argument("--minutes", type=float, default=25.0, help="training wall-clock budget")
    p.add_argument("--copies", type=int, default=1, help="augmented copies of the data")
    p.add_argument("--dev-fraction", type=float, default=0.03)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=HEAD_FILE)
    p.add_argument("--max-utterances", type=int, help="use only this many of the manifest")
    p.add_argument("--init", type=Path, help="continue training this head (.npz)")
    p.add_argument("--real", type=Path, help="pseudo-labelled real speech manifest")
    p.add_argument("--real-repeat", type=int, default=20, help="times the real set is seen")
    p.add_argument("--heldout", type=Path, help="held-out synthetic manifest (WER only)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(a.threads)
    train_head(a.manifest, a.minutes, a.copies, a.lr, a.dev_fraction, a.out,
               a.max_utterances, a.init, a.real, a.real_repeat, a.heldout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
