"""The result messages' schema, as markdown (served to clients and quoted in docs)."""

from __future__ import annotations

from streamasr.core.decoding.config import (
    DEFAULT_ENDPOINTING_MS,
    DEFAULT_RULE1_MIN_TRAILING_SILENCE,
    DEFAULT_RULE2_MIN_TRAILING_SILENCE,
    DEFAULT_RULE3_MIN_UTTERANCE_LENGTH,
    DEFAULT_UTTERANCE_END,
)

results_schema_doc = f"""\
# Result messages

Every request of a stream returns a list of JSON messages (modelled on Deepgram's live
API).  Times are seconds from the start of the stream (plus the decoder's `time_offset`),
rounded to 1 ms; they are multiples of the model's output frame length.

## `Results`

```json
{{"type": "Results", "is_final": false, "speech_final": false, "from_finalize": false,
 "start": 0.0, "duration": 1.2,
 "channel": {{"alternatives": [{{"transcript": "hello world", "confidence": 0.93,
   "words": [{{"word": "hello", "start": 0.12, "end": 0.44, "confidence": 0.95}},
             {{"word": "world", "start": 0.52, "end": 0.9, "confidence": 0.91}}]}}]}}}}
```

| field | type | meaning |
| --- | --- | --- |
| `type` | string | `"Results"` |
| `is_final` | bool | `false`: an *interim*, the current hypothesis of the open utterance, sent at the end of every request that carries audio (even when it completed no output frame) and revised by later messages. `true`: a *final*; its words are never revised, and later messages carry only later words |
| `speech_final` | bool | `true` only on a final sent because the speaker paused: the voice-activity detector heard `endpointing` ({DEFAULT_ENDPOINTING_MS} ms by default) of silence after speech, or endpoint rule 1 or 2 (trailing silence of {DEFAULT_RULE2_MIN_TRAILING_SILENCE} s after text by default) |
| `from_finalize` | bool | `true` only on the final that answers an explicit Finalize request |
| `start` | float s | start of the utterance (the frame after the previous final) |
| `duration` | float s | length of the utterance so far (final: up to the frame the utterance ended at, trailing silence included) |
| `channel.alternatives` | list | exactly one alternative (the best hypothesis) |
| `alternatives[0].transcript` | string | the words joined by single spaces; may be `""` |
| `alternatives[0].confidence` | float 0..1 | **mean** of the word confidences (0 when there are no words) |
| `alternatives[0].words` | list | one entry per word, in order |
| `words[].word` | string | the word's text |
| `words[].start` | float s | start of the output frame where the word's first token is first emitted (CTC spike) |
| `words[].end` | float s | end of the last frame of the word's last token (the frame after it) |
| `words[].confidence` | float 0..1 | mean over the word's tokens of each token's peak posterior (the highest probability of that token over the frames aligned to it) |

### Two-pass finals (model `streaming_asr_two_pass`)

Interims and every other message are the same as `streaming_asr`'s (unless the stream
asks for Whisper interims, below); each final with words is re-decoded by Whisper tiny.en
from the utterance's audio features and gets:

| field | type | meaning |
| --- | --- | --- |
| `rescored` | bool | `true`: transcript, words and confidence come from the re-decode; `false`: the re-decoded text could not be aligned to the utterance's frames and the first pass is kept |
| `first_pass_transcript` | string | the streaming CTC transcript the final would have had (when `rescored`) |
| `words[]` | list | the re-decoded words (lower case, numbers spelled out, the model's alphabet), timed by CTC forced alignment on the utterance's log-probs; `confidence`: mean over the word's characters of their peak posterior on their aligned frames |
| `words[].punctuated_word` | string | the word as Whisper wrote it: cased, with its punctuation (`"Mr."` for `mister`; a written token spelled out as several words keeps its leading punctuation and capital on the first, its trailing punctuation on the last); absent from every word when Whisper's text does not line up word for word with `words[]` |

A final that had no words, or whose utterance is longer than 30 s (Whisper's window), is
not re-decoded and has neither field.  The response carrying a re-decoded final arrives
after the re-decode, possibly after the responses to the stream's later chunks: read a
stream's responses in request order (the bundled client does, by request id).

### Whisper interims (stream option `interims=whisper`, model `streaming_asr_two_pass`)

Every `interim_refresh_s` of audio, and at a pause (0.3 s after a word heard since the
last re-decode), the open utterance is re-decoded by Whisper; words that two consecutive
re-decodes agree on, from the utterance's start, become *stable* (the LocalAgreement
policy of whisper_streaming).  A re-decode hears only the audio after the last stable
word, with the stable words as Whisper's prompt.  Re-decodes never hold up a chunk's
answer: each chunk is answered at once (the last re-decode's words, then the CTC words
heard since), and a re-decode, once done, arrives as an interim of its own, a second
response to the chunk that asked for it, marked `refresh: true` (the bundled client
passes it on after that chunk's answer; a re-decode overtaken by a newer one or by the
utterance's final is not sent).  Every interim of such a stream keeps the schema above,
and each of its words gets one more field:

| field | type | meaning |
| --- | --- | --- |
| `words[].stable` | bool | `true`: agreed by two re-decodes; later interims of the utterance show it unchanged, at the same position (only the final, re-decoded afresh, may still differ). `false`: the unstable tail: the newest re-decode's words after the stable ones, then the CTC words heard since that re-decode |
| `rescored` | bool | `true` when the interim shows Whisper words; `false` before the utterance's first re-decode (CTC words only, all unstable) |
| `first_pass_transcript` | string | the CTC interim's transcript |
| `refresh` | bool | only on a re-decode sent on its own (`true`): it answers no request; its `start` / `duration` are those of the newest CTC interim of the utterance |

Stable words always lead: `words[]` is the stable words, then the tail.

## `UtteranceEnd`

```json
{{"type": "UtteranceEnd", "last_word_end": 3.52}}
```

Sent once after a final with words when `utterance_end` seconds (default
{DEFAULT_UTTERANCE_END}) of silence have followed its last word with no new word started;
also when the stream is closed while one is still owed.

| field | type | meaning |
| --- | --- | --- |
| `type` | string | `"UtteranceEnd"` |
| `last_word_end` | float s | `end` of the last word of the finalized utterance |

## When messages are sent

* each request that carries audio: any finals (and UtteranceEnds) that its frames
  produced, in order, then exactly one interim for the utterance left open (possibly
  empty);
* an endpoint of the voice-activity detector (`endpointing`, {DEFAULT_ENDPOINTING_MS} ms of
  silence after speech): the open utterance's final (`speech_final=true`) in the response
  to the request whose audio completed that silence; with nothing decoded the utterance
  restarts without a message (unless `empty_finals`);
* endpoint rule 1 ({DEFAULT_RULE1_MIN_TRAILING_SILENCE} s of silence with nothing decoded)
  starts a new utterance **without** a message (unless `empty_finals`); rule 2 (see
  `speech_final`) and rule 3 (utterance of {DEFAULT_RULE3_MIN_UTTERANCE_LENGTH} s,
  `speech_final=false`) send a final;
* Finalize: one final with `from_finalize=true`, even when it is empty;
* end of stream: the open utterance's final if it has words, then an owed UtteranceEnd;
* keep-alive: nothing.
"""
