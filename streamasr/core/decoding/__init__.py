"""CTC decoding for streams: log-prob frames -> interim/final result messages.

Pure Python + numpy (no Triton imports); the Triton model ``ctc_decoder`` keeps one
:class:`StreamDecoder` per stream::

    dec = StreamDecoder(contract, config=DecoderConfig(), endpoint=EndpointConfig())
    msgs = dec.accept(log_probs)   # float32 [T, V], this request's frames in stream order
    msgs = dec.finalize()          # explicit Finalize: flush the open utterance
    msgs = dec.close()             # end of stream
    msgs = dec.keepalive()         # -> []
    dec.frames_decoded             # output frames consumed so far

Semantics
---------
* **Decoding.**  ``decoding="greedy"`` (default): best path; repeats collapse across
  request boundaries because the previous frame's argmax is stream state.
  ``decoding="beam"``: CTC prefix beam search (``beam_size`` prefixes, the
  ``beam_top_k`` most likely non-blank tokens tried per frame) whose beams carry across
  requests; interims show the best beam.  Tokens become words by the contract's
  ``word_boundary`` ("space": the token " " separates words; "sentencepiece": a leading
  "\u2581" starts one).
* **Hotwords** (beam only): ``hotwords=[("phrase", boost), ...]`` -- a prefix tree over
  the phrases' tokens (greedy longest match over the vocabulary); a hypothesis gains
  ``boost`` per matched token while it grows along a phrase, keeps the bonus when the
  phrase completes and loses it when it leaves the tree before completing it.
* **Word n-gram LM** (beam only, optional): ``lm_path`` names an ARPA or KenLM binary
  word LM; completed words add ``lm_alpha * ln P + lm_beta`` (see :mod:`.lm`).  It needs
  the ``kenlm`` module (``pip install kenlm``, built from source; installed in this
  project's dev environment).  Without it, ``lm_path`` is rejected with a clear
  ValueError and nothing else changes.  pyctcdecode is *not* used: it decodes whole
  matrices, and its beams cannot be carried across streaming requests.
* **Interims and finals.**  Each ``accept`` returns the finals its frames produced, then
  one interim (``is_final=false``) with the open utterance's hypothesis.  Finals are
  never revised: after a final the search restarts with an empty hypothesis (only the
  CTC "same token continues" state is carried), so later messages hold only new words.
* **Endpointing** (sherpa-onnx's rules, checked after every frame, so the result does not
  depend on how the stream was cut; "silence" = frames after the best hypothesis' last
  token; a rule set to 0 is off; ``endpointing=false`` turns all off):
  rule 1: >= ``rule1_min_trailing_silence`` (2.4 s) of silence with nothing decoded ->
  the utterance restarts silently (an empty final only with ``empty_finals=true``);
  rule 2: >= ``rule2_min_trailing_silence`` (1.2 s) of silence after some text -> final
  with ``speech_final=true``; rule 3: utterance >= ``rule3_min_utterance_length`` (20 s)
  -> final with ``speech_final=false``.  Times keep counting from the stream's start.
* **UtteranceEnd** (Deepgram semantics): after a final with words, once
  ``utterance_end`` (1.0 s) of silence has followed its last word and no new word has
  started, ``{"type": "UtteranceEnd", "last_word_end": s}``; at ``close()`` an owed one
  is sent at once.
* **Timings and confidence** come from the CTC alignment of the best hypothesis: a word
  starts at the frame where its first token is first emitted and ends after the last
  frame of its last token (frame index * ``contract.output_frame_seconds`` +
  ``time_offset``).  Word confidence = mean of its tokens' peak posteriors (exp of the
  log-prob); utterance confidence = **mean** of its word confidences (Deepgram reports
  a mean-like score; min would let one weak word dominate), 0 for no words.
* ``finalize()`` always returns one final with ``from_finalize=true`` (even empty, as
  the acknowledgement of the request); ``close()`` returns the open utterance's final if
  it has words, then an owed UtteranceEnd, and ends the stream; ``keepalive()`` returns
  ``[]``.

Every message field is documented in :data:`results_schema_doc`.
"""

from streamasr.core.decoding.config import DecoderConfig, EndpointConfig
from streamasr.core.decoding.schema import results_schema_doc
from streamasr.core.decoding.stream import StreamDecoder, decode_whole

__all__ = ["StreamDecoder", "DecoderConfig", "EndpointConfig", "results_schema_doc", "decode_whole"]
