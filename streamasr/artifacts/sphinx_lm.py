"""Read a CMU Sphinx binary trie LM (``*.lm.bin``, "Trie Language Model") into n-grams.

The CMU en-us trigram that ships in PyPI ``pocketsphinx==5.1.1``
(``pocketsphinx/model/en-us/en-us.lm.bin``) is the only general English word LM obtainable
offline.  Sphinx's own converter cannot turn it into ARPA: the header claims 2,051,547
bigrams, the trie holds 2,051,541, and ``ngram_model_trie_write_arpa`` asserts that the two
agree (upstream pocketsphinx issue #502).  This reader walks the trie the way that function
does (``lm_trie_fill_raw_ngram`` in pocketsphinx 5.1.1 ``src/lm/lm_trie.c``) and reports the
n-grams it actually finds, so the ARPA written from it states true counts.

File layout (little-endian, from ``ngram_model_trie_read_bin``):
  "Trie Language Model" (19 bytes, no NUL) | order: u8 | counts: u32 x order |
  quantiser: i32 (unused) + f32 tables (prob/backoff bins, 2^16 each per middle order, then
  2^16 longest prob bins) | unigrams: (counts[0] + 1) x {f32 prob, f32 backoff, u32 next} |
  bit-packed n-gram arrays | word strings: u32 size + NUL-separated words.
Each middle entry is [word | backoff bin | prob bin | next pointer] bit-packed; each longest
entry [word | prob bin].  Scores are stored in Sphinx ``logmath`` units of base 1.0001 (the
default ``-logbase``; the file does not record it); :func:`read` returns log10.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAGIC = b"Trie Language Model"
QUANT_BITS = 16  # prob and backoff bins: fixed at 16 bits in pocketsphinx 5
MIDDLE_QUANT_BITS = 2 * QUANT_BITS
LONGEST_QUANT_BITS = QUANT_BITS
PAD_BYTES = 8  # sizeof(uint64) slack after each packed array
LOG10_PER_UNIT = float(np.log10(1.0001))  # Sphinx logmath base -> log10


def required_bits(max_value: int) -> int:
    return int(max_value).bit_length()


def packed_size(entries: int, max_vocab: int, remaining_bits: int) -> int:
    """Bytes of one bit-packed array (``base_size`` in lm_trie.c): one extra entry holds
    the end pointer of the last node."""
    total_bits = required_bits(max_vocab) + remaining_bits
    return ((1 + entries) * total_bits + 7) // 8 + PAD_BYTES


@dataclass
class NGrams:
    """One order's n-grams: word ids [n, order], log10 prob, log10 backoff (None for the
    highest order)."""

    words: np.ndarray
    prob: np.ndarray
    backoff: np.ndarray | None


@dataclass
class SphinxLM:
    vocabulary: list[str]
    header_counts: list[int]
    unigram_prob: np.ndarray  # log10
    unigram_backoff: np.ndarray  # log10
    ngrams: list[NGrams]  # orders 2..N

    @property
    def order(self) -> int:
        return len(self.header_counts)

    @property
    def counts(self) -> list[int]:
        """The n-gram counts actually present (the header may overstate them)."""
        return [len(self.vocabulary)] + [len(g.prob) for g in self.ngrams]


def _read_bits(mem: np.ndarray, bit_offsets: np.ndarray, mask: int) -> np.ndarray:
    """``bitarr_read_int25``: a little-endian u32 from byte offset>>3, shifted by offset&7."""
    byte = (bit_offsets >> 3).astype(np.int64)
    v = (
        mem[byte].astype(np.uint32)
        | (mem[byte + 1].astype(np.uint32) << 8)
        | (mem[byte + 2].astype(np.uint32) << 16)
        | (mem[byte + 3].astype(np.uint32) << 24)
    )
    return ((v >> (bit_offsets & 7).astype(np.uint32)) & np.uint32(mask)).astype(np.int64)


def read(path: str | Path) -> SphinxLM:
    data = np.fromfile(str(path), dtype=np.uint8)
    if bytes(data[: len(MAGIC)]) != MAGIC:
        raise ValueError(f"{path}: not a Sphinx trie LM (header {bytes(data[:19])!r})")
    pos = len(MAGIC)
    order = int(data[pos])
    pos += 1
    if not 2 <= order <= 5:
        raise ValueError(f"{path}: unsupported n-gram order {order}")
    counts = np.frombuffer(data[pos : pos + 4 * order].tobytes(), "<u4").astype(np.int64)
    pos += 4 * order + 4  # + unused quantiser type
    n_tables = (order - 2) * 2 + 1
    tables = np.frombuffer(data[pos : pos + 4 * (n_tables << QUANT_BITS)].tobytes(), "<f4")
    tables = tables.reshape(n_tables, 1 << QUANT_BITS)
    pos += 4 * (n_tables << QUANT_BITS)
    n_uni = int(counts[0])
    uni = np.frombuffer(
        data[pos : pos + 12 * (n_uni + 1)].tobytes(),
        dtype=np.dtype([("prob", "<f4"), ("bo", "<f4"), ("next", "<u4")]),
    )
    pos += 12 * (n_uni + 1)

    # bit-packed arrays: middles (orders 2..N-1), then longest (order N)
    word_bits = required_bits(n_uni)
    arrays = []
    for i in range(1, order - 1):
        next_bits = required_bits(int(counts[i + 1]))
        size = packed_size(int(counts[i]), n_uni, MIDDLE_QUANT_BITS + next_bits)
        arrays.append(
            (data[pos : pos + size], word_bits + MIDDLE_QUANT_BITS + next_bits, next_bits)
        )
        pos += size
    size = packed_size(int(counts[order - 1]), n_uni, LONGEST_QUANT_BITS)
    arrays.append((data[pos : pos + size], word_bits + LONGEST_QUANT_BITS, 0))
    pos += size

    k = int(np.frombuffer(data[pos : pos + 4].tobytes(), "<u4")[0])
    pos += 4
    words = bytes(data[pos : pos + k]).split(b"\0")[:-1]
    if pos + k != len(data):
        raise ValueError(f"{path}: {len(data) - pos - k} trailing bytes after the word list")
    if len(words) != n_uni:
        raise ValueError(f"{path}: {len(words)} word strings for {n_uni} unigrams")
    vocabulary = [w.decode("utf-8", errors="replace") for w in words]

    word_mask = (1 << word_bits) - 1
    # hist[:, 0] is the unigram the walk starts from; each level appends one word.
    begin = uni["next"][:-1].astype(np.int64)
    end = uni["next"][1:].astype(np.int64)
    hist = np.arange(n_uni, dtype=np.int64)[:, None]
    ngrams = []
    for level, (mem, total_bits, next_bits) in enumerate(arrays):
        n_ctx = end - begin
        keep = n_ctx > 0
        hist, begin, n_ctx = hist[keep], begin[keep], n_ctx[keep]
        ptr = np.repeat(begin, n_ctx) + (
            np.arange(int(n_ctx.sum())) - np.repeat(np.cumsum(n_ctx) - n_ctx, n_ctx)
        )
        parent = np.repeat(hist, n_ctx, axis=0)
        off = ptr * total_bits
        word = _read_bits(mem, off, word_mask)
        hist = np.concatenate([parent, word[:, None]], axis=1)
        q = off + word_bits
        is_longest = level == len(arrays) - 1
        if is_longest:
            prob = tables[-1][_read_bits(mem, q, (1 << QUANT_BITS) - 1)]
            backoff = None
        else:
            backoff = tables[2 * level + 1][_read_bits(mem, q, (1 << QUANT_BITS) - 1)]
            prob = tables[2 * level][_read_bits(mem, q + QUANT_BITS, (1 << QUANT_BITS) - 1)]
            nmask = (1 << next_bits) - 1
            begin = _read_bits(mem, off + word_bits + MIDDLE_QUANT_BITS, nmask)
            end = _read_bits(mem, (ptr + 1) * total_bits + word_bits + MIDDLE_QUANT_BITS, nmask)
        # the trie is keyed from the last word back: reverse to reading order
        ngrams.append(
            NGrams(
                hist[:, ::-1].copy(),
                (prob * LOG10_PER_UNIT).astype(np.float32),
                None if backoff is None else (backoff * LOG10_PER_UNIT).astype(np.float32),
            )
        )
    return SphinxLM(
        vocabulary,
        [int(c) for c in counts],
        (uni["prob"][:-1] * LOG10_PER_UNIT).astype(np.float32),
        (uni["bo"][:-1] * LOG10_PER_UNIT).astype(np.float32),
        ngrams,
    )
