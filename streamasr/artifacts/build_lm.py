"""``make lm``: the word LM the CTC beam search fuses, as an ARPA file KenLM loads.

    python -m streamasr.artifacts.build_lm --out model_repository/ctc_decoder/1/en-us.arpa

Source: the CMU Sphinx en-us trigram (72.5 k words, lower case) shipped in PyPI
``pocketsphinx==5.1.1`` (BSD-style licence, ``pocketsphinx/model/en-us/en-us.lm.bin``),
read by :mod:`streamasr.artifacts.sphinx_lm` because Sphinx's own converter aborts on it.

What is added: an ``<unk>`` unigram.  The CMU file has none, so KenLM would give every
out-of-vocabulary word ``-100`` (log10) and the beam search would prefer gluing words
together; with ``<unk>`` at ``--unk-log10`` an unknown word costs a fixed, finite amount
(the decoder's partial-word scoring charges the same cost as soon as a word leaves the
vocabulary, see ``streamasr.core.decoding.lm``).

Licence: the CMU LM is distributed with pocketsphinx under its BSD-style licence.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np

from . import sphinx_lm

log = logging.getLogger("streamasr.artifacts.build_lm")
UNK = "<unk>"
#: log10 P(<unk>): measured with beam 16 on assets/eval and the Asterisk prompts while
#: planning (issue 11): -7 stops run-on words without forbidding rare words.
DEFAULT_UNK_LOG10 = -7.0
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "model_repository" / "ctc_decoder" / "1" / "en-us.arpa"


def packaged_sphinx_lm() -> Path:
    import pocketsphinx

    path = Path(pocketsphinx.__file__).parent / "model" / "en-us" / "en-us.lm.bin"
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: pip install pocketsphinx==5.1.1")
    return path


def _fmt(x: np.ndarray) -> list[str]:
    return [f"{v:.4f}" for v in x.tolist()]


def write_arpa(lm: sphinx_lm.SphinxLM, out: Path, unk_log10: float = DEFAULT_UNK_LOG10) -> dict:
    """Write ``lm`` as ARPA with the n-gram counts actually present, plus ``<unk>``."""
    vocab = lm.vocabulary
    has_unk = UNK in vocab
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    counts = lm.counts
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\\data\\\n")
        f.write(f"ngram 1={counts[0] + (0 if has_unk else 1)}\n")
        for n, c in enumerate(counts[1:], start=2):
            f.write(f"ngram {n}={c}\n")
        f.write("\n\\1-grams:\n")
        if not has_unk:
            f.write(f"{unk_log10:.4f}\t{UNK}\t0.0000\n")
        for p, w, b in zip(_fmt(lm.unigram_prob), vocab, _fmt(lm.unigram_backoff)):
            f.write(f"{p}\t{w}\t{b}\n")
        for n, g in enumerate(lm.ngrams, start=2):
            f.write(f"\n\\{n}-grams:\n")
            words = [[vocab[i] for i in col] for col in g.words.T.tolist()]
            text = ["\t".join(ws) for ws in zip(*words)]
            probs = _fmt(g.prob)
            if g.backoff is None:
                f.writelines(f"{p}\t{t}\n" for p, t in zip(probs, text))
            else:
                f.writelines(f"{p}\t{t}\t{b}\n" for p, t, b in zip(probs, text, _fmt(g.backoff)))
        f.write("\n\\end\\\n")
    tmp.replace(out)
    return {
        "counts": [counts[0] + (0 if has_unk else 1), *counts[1:]],
        "header_counts": lm.header_counts,
        "unk_log10": unk_log10,
        "bytes": out.stat().st_size,
    }


def build(
    out: Path = DEFAULT_OUT, source: Path | None = None, unk_log10: float = DEFAULT_UNK_LOG10
) -> dict:
    t0 = time.time()
    source = source or packaged_sphinx_lm()
    lm = sphinx_lm.read(source)
    log.info("read %s: header counts %s, found %s", source, lm.header_counts, lm.counts)
    info = write_arpa(lm, out, unk_log10)
    log.info(
        "wrote %s (%.0f MB, counts %s) in %.1f s",
        out,
        info["bytes"] / 1e6,
        info["counts"],
        time.time() - t0,
    )
    return info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m streamasr.artifacts.build_lm",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--source", type=Path, help="Sphinx .lm.bin (default: pocketsphinx's en-us)")
    p.add_argument("--unk-log10", type=float, default=DEFAULT_UNK_LOG10)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    build(a.out, a.source, a.unk_log10)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
