"""Two-pass finals: interims from streaming CTC, finals re-decoded by Whisper.

In process: the utterance bookkeeping, the re-alignment and the decoder step's
attachments.  Through a REAL tritonserver: `streaming_asr_two_pass` gives exactly the
one-pass interims and final spans, and finals equal to the same re-decode done here."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import struct
import threading

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from streamasr.core.alignment import aligned_words
from streamasr.core.evaluation import wer_cer
from streamasr.core.two_pass import (
    FinalPass,
    Utterance,
    UtteranceRecorder,
    chunk_features,
    to_vocabulary,
    written_words,
)
from streamasr.core.whisper_redecoder import Decoded
from streamasr.pipeline import ctc_decoder, final_pass, offline_asr
from streamasr.pipeline.common import ConfigError, ModelConfig, read_config
from streamasr.pipeline.step_info import StepInfo
from streamasr.protocol.contract import ModelContract
from streamasr.tools.tiny_model import tiny_contract
from streamasr_client.stream import TWO_PASS_MODEL, AsrConnection, Session

from ..helpers import REPOSITORY, ROOT

TINY = tiny_contract()
# the served model's contract (its vocabulary: lower-case letters, apostrophe, space)
REAL = ModelContract.from_onnx(REPOSITORY / "acoustic_model" / "1" / "model.onnx")
V = len(TINY.vocabulary)
WHISPER_DIR = REPOSITORY / "final_pass" / "1"


def one_hot(tokens: str) -> np.ndarray:
    """[T, V] log-probs spelling ``tokens`` ('_' = blank)."""
    lp = np.full((len(tokens), V), -20.0, np.float32)
    for t, ch in enumerate(tokens):
        lp[t, TINY.blank_id if ch == "_" else TINY.vocabulary.index(ch)] = 0.0
    return lp


class FixedText:
    """A stand-in re-decoder that 'hears' a fixed text (the Triton path uses Whisper)."""

    def __init__(self, text: str):
        self.text, self.calls = text, []

    def transcribe_many(self, features, silence) -> list[Decoded]:
        self.calls += features
        return [Decoded(self.text, len(f)) for f in features]


# -- in process ---------------------------------------------------------------------------
def test_chunk_features_are_each_windows_own_frames_per_output_frame():
    c = TINY
    n, w, f = 3, c.window_frames, c.features.n_mels
    windows = np.arange(n * w * f, dtype=np.float32).reshape(n, w, f)
    got = chunk_features(windows, [c.output_frames, c.output_frames, 5], c)
    want = np.concatenate(
        [
            windows[0, c.left_frames : c.left_frames + c.chunk_frames],
            windows[1, c.left_frames : c.left_frames + c.chunk_frames],
            windows[2, c.left_frames : c.left_frames + 5 * c.subsampling],
        ]
    )
    np.testing.assert_array_equal(got, want)


def test_recorder_cuts_an_utterance_and_forgets_settled_frames():
    rec = UtteranceRecorder(TINY)
    sub, f = TINY.subsampling, TINY.features.n_mels
    lp = np.arange(10 * V, dtype=np.float32).reshape(10, V)
    feats = np.arange(10 * sub * f, dtype=np.float32).reshape(10 * sub, f)
    rec.append(lp[:4], feats[: 4 * sub])
    rec.append(lp[4:], feats[4 * sub :])
    got_f, got_lp = rec.cut(3, 7)
    np.testing.assert_array_equal(got_lp, lp[3:7])
    np.testing.assert_array_equal(got_f, feats[3 * sub : 7 * sub])
    rec.trim(7)
    assert rec.frames == 3 and rec.cut(3, 7) is None  # settled frames are gone
    np.testing.assert_array_equal(rec.cut(7, 10)[1], lp[7:])


def test_recorder_drops_an_utterance_longer_than_its_limit():
    rec = UtteranceRecorder(TINY, max_seconds=10 * TINY.output_frame_seconds)
    sub, f = TINY.subsampling, TINY.features.n_mels
    for _ in range(3):
        rec.append(np.zeros((5, V), np.float32), np.zeros((5 * sub, f), np.float32))
    assert rec.frames <= 10
    assert rec.cut(0, 15) is None  # its start was dropped
    assert rec.cut(10, 15) is not None


def test_whisper_text_is_put_in_the_models_alphabet():
    assert (
        to_vocabulary("Mr. Smith paid $25, didn't he?", TINY)
        == "mister smith paid twenty five didn't he"
    )


def test_aligned_words_follow_the_frames():
    lp = one_hot("__hh_i___yy_oo_u__")
    words = aligned_words(lp, "hi you", TINY.vocabulary, TINY.blank_id)
    assert [(w, a, b) for w, a, b, _ in words] == [("hi", 2, 6), ("you", 9, 16)]
    assert all(abs(c - 1.0) < 1e-6 for *_, c in words)


def final_message(start: float = 1.0, text: str = "hx") -> dict:
    return {
        "type": "Results",
        "is_final": True,
        "speech_final": True,
        "from_finalize": False,
        "start": start,
        "duration": 0.4,
        "channel": {
            "alternatives": [
                {
                    "transcript": text,
                    "confidence": 0.5,
                    "words": [
                        {"word": text, "start": start, "end": start + 0.1, "confidence": 0.5}
                    ],
                }
            ]
        },
    }


def test_rewrite_replaces_the_text_and_times_its_words():
    fs = TINY.output_frame_seconds
    lp = one_hot("__hh_i___yy_oo_u__")
    utt = Utterance(1, np.zeros((len(lp) * TINY.subsampling, 80), np.float32), lp)
    interim = {"type": "Results", "is_final": False}
    out = FinalPass(TINY, FixedText("Hi, you!")).process([interim, final_message(1.0)], [utt])
    assert out[0] is interim
    m = out[1]
    assert m["rescored"] is True and m["first_pass_transcript"] == "hx"
    alt = m["channel"]["alternatives"][0]
    assert alt["transcript"] == "hi you"
    assert [(w["word"], w["start"], w["end"]) for w in alt["words"]] == [
        ("hi", round(1.0 + 2 * fs, 3), round(1.0 + 6 * fs, 3)),
        ("you", round(1.0 + 9 * fs, 3), round(1.0 + 16 * fs, 3)),
    ]
    assert (m["start"], m["duration"], m["speech_final"]) == (1.0, 0.4, True)


def test_rewrite_keeps_whispers_written_words_as_punctuated_word():
    lp = one_hot("__hh_i___yy_oo_u__")
    utt = Utterance(0, np.zeros((len(lp) * TINY.subsampling, 80), np.float32), lp)
    (m,) = FinalPass(TINY, FixedText("Hi, you!")).process([final_message(1.0)], [utt])
    words = m["channel"]["alternatives"][0]["words"]
    assert [(w["word"], w["punctuated_word"]) for w in words] == [("hi", "Hi,"), ("you", "you!")]


def test_written_words_line_up_with_the_models_words():
    pairs = written_words("Mr. Smith's 25 cats -- well, \u201cfine.\u201d", REAL)
    assert pairs == [
        ("mister", "Mr."),
        ("smith's", "Smith's"),
        ("twenty", "twenty"),
        ("five", "five"),
        ("cats", "cats--"),
        ("well", "well,"),
        ("fine", "\u201cfine.\u201d"),
    ]
    assert [w for w, _ in pairs] == to_vocabulary(
        "Mr. Smith's 25 cats -- well, \u201cfine.\u201d", REAL
    ).split()
    assert written_words("Hundred-year-old 100.", REAL)[-2:] == [
        ("one", "one"),
        ("hundred", "hundred."),
    ]


def test_a_text_that_cannot_fit_the_frames_keeps_the_first_pass():
    lp = one_hot("_h_")
    utt = Utterance(0, np.zeros((3 * TINY.subsampling, 80), np.float32), lp)
    msg = final_message()
    out = FinalPass(TINY, FixedText("a much longer sentence")).process([msg], [utt])
    assert out[0]["rescored"] is False
    assert out[0]["channel"] == msg["channel"]


def test_an_utterance_must_point_at_a_final():
    utt = Utterance(0, np.zeros((2, 80), np.float32), one_hot("_"))
    with pytest.raises(ValueError, match="not a final"):
        FinalPass(TINY, FixedText("x")).process([{"type": "Results", "is_final": False}], [utt])


@pytest.mark.parametrize(
    "utt, problem",
    [
        (Utterance(0, np.zeros((6, 80), np.float32), np.zeros((3, 5), np.float32)), "log_probs"),
        (Utterance(0, np.zeros((5, 80), np.float32), one_hot("_a_")), "features"),
        (
            Utterance(0, np.zeros((3000, 80), np.float32), np.zeros((1501, V), np.float32)),
            "log_probs",
        ),  # over Whisper's 30 s
        (Utterance(0, np.full((6, 80), np.nan, np.float32), one_hot("_a_")), "NaN"),
    ],
)
def test_a_direct_caller_cannot_send_a_bad_or_unbounded_utterance(utt, problem):
    fixed = FixedText("a")
    with pytest.raises(ValueError, match=problem):
        FinalPass(TINY, fixed).process([final_message()], [utt])
    assert fixed.calls == []  # nothing was re-decoded


@pytest.mark.parametrize("blob", [b"", b"not a zip", b"PK\x03\x04garbage"])
def test_bytes_that_are_not_an_utterance_are_refused_by_name(blob):
    with pytest.raises(ValueError, match="UTTERANCES"):
        Utterance.from_bytes(blob)


def test_utterances_survive_serialisation():
    u = Utterance(3, np.random.default_rng(0).random((8, 80), dtype=np.float32), one_hot("_ab_"))
    back = Utterance.from_bytes(u.to_bytes())
    assert back.index == 3
    np.testing.assert_array_equal(back.features, u.features)
    np.testing.assert_array_equal(back.log_probs, u.log_probs)


def test_decoder_step_attaches_each_worded_final_its_frames():
    """Two-pass streams (FEATURES present) get the utterance of every final with words,
    cut from exactly the frames the final spans; one-pass streams get none."""
    c = TINY
    step = ctc_decoder.CtcDecoderStep(c, ctc_decoder.DecoderDefaults(), idle_timeout_s=30)
    rng = np.random.default_rng(1)
    pieces = ["_h_i_", "_____", "_y_o_u", "____"]
    windows, sent_lp, got = [], [], []
    for i, p in enumerate(pieces):
        info = StepInfo(
            stream=5,
            seq=i,
            start=i == 0,
            end=i == len(pieces) - 1,
            windows=1,
            valid_outputs=[len(p)],
            finalize=i == 1,
        )
        feats = rng.random((1, c.window_frames, c.features.n_mels), dtype=np.float32)
        lp = np.zeros((1, c.output_frames, V), np.float32)
        lp[0, : len(p)] = one_hot(p)
        windows.append(feats)
        sent_lp.append(lp[0, : len(p)])
        msgs, utts = step.process_full(ctc_decoder.DecoderRequest(lp, info, feats))
        got.append((msgs, utts))
    all_feats = chunk_features(np.concatenate(windows), [len(p) for p in pieces], c)
    all_lp = np.concatenate(sent_lp)
    finals = [(msgs, u) for msgs, utts in got for u in utts]
    assert len(finals) == 2  # "hi" (finalize), "you" (END)
    spans = [(0, 10), (10, 20)]  # Finalize and END come after their requests' frames
    for (msgs, u), (a, b) in zip(finals, spans):
        assert msgs[u.index]["is_final"]
        np.testing.assert_array_equal(u.log_probs, all_lp[a:b])
        np.testing.assert_array_equal(u.features, all_feats[a * c.subsampling : b * c.subsampling])
    assert len(step.store) == 0
    # the same stream without FEATURES: one-pass, nothing attached
    for i, p in enumerate(pieces):
        info = StepInfo(
            stream=6,
            seq=i,
            start=i == 0,
            end=i == len(pieces) - 1,
            windows=1,
            valid_outputs=[len(p)],
            finalize=i == 1,
        )
        lp = np.zeros((1, c.output_frames, V), np.float32)
        lp[0, : len(p)] = one_hot(p)
        assert step.process_full(ctc_decoder.DecoderRequest(lp, info))[1] == []


def test_a_refused_request_leaves_the_recording_in_step_with_the_decoder():
    c = TINY
    step = ctc_decoder.CtcDecoderStep(c, ctc_decoder.DecoderDefaults(), idle_timeout_s=30)
    rng = np.random.default_rng(2)

    def request(seq, piece, lp_fill=None, end=False):
        info = StepInfo(
            stream=9, seq=seq, start=seq == 0, end=end, windows=1, valid_outputs=[len(piece)]
        )
        lp = np.zeros((1, c.output_frames, V), np.float32)
        lp[0, : len(piece)] = one_hot(piece)
        if lp_fill is not None:
            lp[0, 0, 0] = lp_fill
        feats = rng.random((1, c.window_frames, c.features.n_mels), dtype=np.float32)
        return ctc_decoder.DecoderRequest(lp, info, feats), feats

    r0, f0 = request(0, "_h_i_")
    step.process_full(r0)
    bad, _ = request(1, "_____", lp_fill=np.nan)
    with pytest.raises(ValueError, match="NaN"):
        step.process_full(bad)
    r1, f1 = request(1, "_____", end=True)
    msgs, utts = step.process_full(r1)
    (u,) = utts
    want = chunk_features(np.concatenate([f0, f1]), [5, 5], c)
    np.testing.assert_array_equal(u.features, want)  # the refused chunk left no trace


def test_final_pass_refuses_to_load_without_the_whisper_files(tmp_path):
    cfg = ModelConfig(raw={"parameters": {}}, repository=tmp_path / "final_pass", name="final_pass")
    (tmp_path / "final_pass" / "1").mkdir(parents=True)
    with pytest.raises(ConfigError, match="make whisper"):
        final_pass.whisper_dir(cfg)


class OutOfOrderTriton(service_pb2_grpc.GRPCInferenceServiceServicer):
    """A stand-in Triton whose stream answers a session's requests 1 and 2, then the
    next request (another session's: once it is answered, 1 and 2 have reached the
    client, the stream keeps its order), and request 0 only once ``release`` is set."""

    def __init__(self):
        self.release = threading.Event()

    @staticmethod
    def answer(req) -> service_pb2.ModelStreamInferResponse:
        index = int(req.id.partition(":")[2])
        body = json.dumps({"n": index}).encode()
        resp = service_pb2.ModelInferResponse(id=req.id)
        resp.outputs.add(name="RESULTS", datatype="BYTES", shape=[1])
        resp.raw_output_contents.append(struct.pack("<I", len(body)) + body)
        return service_pb2.ModelStreamInferResponse(infer_response=resp)

    def ModelStreamInfer(self, request_iterator, context):
        requests = iter(request_iterator)
        first, second, third, marker = (next(requests) for _ in range(4))
        for req in (second, third, marker):
            yield self.answer(req)
        self.release.wait(30)
        yield self.answer(first)
        for _ in requests:  # until the client half-closes
            pass


@contextlib.contextmanager
def stand_in_triton(servicer):
    """``servicer`` (a stand-in for Triton's gRPC service) on a free loopback port: yields
    its address, stops it after."""
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=2))
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None)


def test_a_session_releases_responses_in_send_order():
    triton = OutOfOrderTriton()
    with stand_in_triton(triton) as url:
        seen: list[dict] = []
        with AsrConnection(url) as conn:
            s = conn.open_session(on_message=seen.append)
            for _ in range(3):
                s.send(np.zeros(1, np.float32))
            marker = conn.open_session()
            marker.send(np.zeros(1, np.float32))
            marker.wait(timeout=30)  # answered after responses 1 and 2 arrived
            assert seen == [] and s.pending == 3  # waiting for response 0
            triton.release.set()
            s.wait(timeout=30)
            assert seen == [{"n": 0}, {"n": 1}, {"n": 2}] and s.pending == 0


class LateResponseTriton(OutOfOrderTriton):
    """A stand-in Triton that answers a session's three requests 1, 1 again (a refresh),
    2, 2 again, then 0: a second response to a request is passed on after its request's
    answer, and responses stay in send order."""

    def ModelStreamInfer(self, request_iterator, context):
        requests = iter(request_iterator)
        first, second, third = (next(requests) for _ in range(3))
        yield self.answer(second)
        yield self.late(second)
        yield self.answer(third)
        self.release.wait(30)
        yield self.answer(first)
        yield self.late(third)
        for _ in requests:  # until the client half-closes
            pass

    def late(self, req) -> service_pb2.ModelStreamInferResponse:
        resp = self.answer(req)
        index = int(req.id.partition(":")[2])
        body = json.dumps({"n": index, "refresh": True}).encode()
        resp.infer_response.raw_output_contents[0] = struct.pack("<I", len(body)) + body
        return resp


def test_a_second_response_to_a_request_follows_its_answer():
    triton = LateResponseTriton()
    with stand_in_triton(triton) as url:
        seen: list[dict] = []
        late = {"n": 2, "refresh": True}
        got_late = threading.Event()

        def on_message(m: dict) -> None:
            seen.append(m)
            if m == late:
                got_late.set()

        with AsrConnection(url) as conn:
            s = conn.open_session(on_message=on_message)
            for _ in range(3):
                s.send(np.zeros(1, np.float32))
            triton.release.set()
            s.wait(timeout=30)
            assert got_late.wait(30)  # it comes after the last answer
            assert seen == [{"n": 0}, {"n": 1}, {"n": 1, "refresh": True}, {"n": 2}, late]
            assert s.pending == 0 and s.messages == seen


def test_a_late_refresh_of_an_utterance_already_final_is_dropped():
    from streamasr_client.stream import Session

    def results(start, final, refresh=False):
        m = {"type": "Results", "is_final": final, "start": start, "duration": 1.0}
        return {**m, "refresh": True} if refresh else m

    s = Session(None, 1, {})  # type: ignore[arg-type]  # delivery needs no connection
    s._sent = 3
    s._deliver(0, [results(0.0, False)], None)
    s._deliver(1, [results(0.0, True), results(1.0, False)], None)
    s._deliver(0, [results(0.0, False, refresh=True)], None)  # overtaken by its final
    s._deliver(1, [results(1.0, False, refresh=True)], None)  # the open utterance's
    s._deliver(2, [results(1.0, False)], None)
    assert [(m["start"], m["is_final"], "refresh" in m) for m in s.messages] == [
        (0.0, False, False),
        (0.0, True, False),
        (1.0, False, False),
        (1.0, False, True),
        (1.0, False, False),
    ]


# -- through the server ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def whisper_final_pass(contract):
    """The re-decode the served final_pass does (its config: graphs, window, threads)."""
    try:
        return final_pass.build_step(read_config(REPOSITORY / "final_pass")).final_pass
    except ConfigError as exc:
        pytest.fail(str(exc), pytrace=False)


def stream(conn: AsrConnection, audio: np.ndarray, chunk: int, model: str) -> Session:
    s = conn.open_session(model=model)
    for i in range(0, len(audio), chunk):
        s.send(audio[i : i + chunk])
    s.close()
    s.wait(timeout=300)
    assert s.errors == []
    return s


def without_finals_text(messages: list[dict]) -> list[dict]:
    """Messages with the parts a re-decode may change taken out of finals."""
    out = []
    for m in messages:
        if m.get("type") == "Results" and m["is_final"]:
            m = {
                k: v
                for k, v in m.items()
                if k not in ("channel", "rescored", "first_pass_transcript")
            }
        out.append(m)
    return out


def whole_file_two_pass(contract, onnx_session, audio, fp: FinalPass) -> list[dict]:
    """In process: the whole file through the same ONNX model, decoder and re-decoder."""
    defaults = ctc_decoder.build_defaults(read_config(REPOSITORY / "ctc_decoder"))

    def run(features):
        return onnx_session.run([contract.output_name], {contract.input_name: features})[0]

    msgs, utts = offline_asr.transcribe_with_utterances(
        contract, audio, None, run, defaults, {}, 16, 3600, True
    )
    return fp.process(msgs, utts)


@pytest.fixture(scope="module")
def both_ways(server, contract, demo_audio):
    conn = AsrConnection(server.grpc_url)
    try:
        one = stream(conn, demo_audio, contract.chunk_samples, "streaming_asr")
        two = stream(conn, demo_audio, contract.chunk_samples, TWO_PASS_MODEL)
    finally:
        conn.close()
    return one.messages, two.messages


def test_two_pass_keeps_every_interim_and_final_span_of_one_pass(both_ways):
    one, two = both_ways
    assert without_finals_text(two) == without_finals_text(one)
    finals_one = [m for m in one if m.get("is_final")]
    finals_two = [m for m in two if m.get("is_final")]
    assert finals_two and all(m["rescored"] for m in finals_two)
    assert [m["first_pass_transcript"] for m in finals_two] == [
        m["channel"]["alternatives"][0]["transcript"] for m in finals_one
    ]


def test_two_pass_finals_equal_the_same_re_decode_in_process(
    both_ways, contract, onnx_session, demo_audio, whisper_final_pass
):
    """The server's streamed two-pass finals == the whole-file decode and re-decode here."""
    want = whole_file_two_pass(contract, onnx_session, demo_audio, whisper_final_pass)
    got = [m for m in both_ways[1] if m.get("is_final")]
    assert [m["channel"] for m in got] == [m["channel"] for m in want if m.get("is_final")]


def test_offline_asr_two_pass_equals_the_re_decode_in_process(
    server, contract, onnx_session, demo_audio, whisper_final_pass
):
    with AsrConnection(server.grpc_url) as conn:
        got = conn.transcribe_file(demo_audio, options={"two_pass": True})
        one = conn.transcribe_file(demo_audio)
    assert got == whole_file_two_pass(contract, onnx_session, demo_audio, whisper_final_pass)
    assert without_finals_text(got) == without_finals_text(one)


def test_two_pass_finals_are_better_and_their_words_sit_in_their_utterance(both_ways):
    one, two = both_ways
    reference = (ROOT / "assets" / "demo.txt").read_text()

    def text(msgs):
        return " ".join(
            m["channel"]["alternatives"][0]["transcript"] for m in msgs if m.get("is_final")
        )

    wer_one, wer_two = (
        wer_cer([reference], [text(one)])["wer"],
        wer_cer([reference], [text(two)])["wer"],
    )
    assert wer_two < 0.2 and wer_two < wer_one / 2, (wer_one, wer_two)
    for m in (m for m in two if m.get("is_final")):
        words = m["channel"]["alternatives"][0]["words"]
        times = [t for w in words for t in (w["start"], w["end"])]
        assert times == sorted(times)
        assert m["start"] <= times[0] and times[-1] <= round(m["start"] + m["duration"], 3)
        assert all(0.0 <= w["confidence"] <= 1.0 for w in words)
