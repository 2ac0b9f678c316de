"""The wire protocol module: what both sides import, and the only part of the server
package a client loads."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from streamasr import protocol

HEAVY = ("numpy", "grpc", "tritonclient", "aiohttp", "onnx", "onnxruntime", "google")


def modules_after_import(module: str) -> list[str]:
    code = f"import sys, {module}; import json; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout
    return json.loads(out)


def test_the_protocol_imports_only_the_standard_library():
    loaded = modules_after_import("streamasr.protocol")
    assert not [m for m in loaded if m.split(".")[0] in HEAVY]
    assert {m for m in loaded if m.startswith("streamasr")} == {
        "streamasr",
        "streamasr.protocol.contract",
        "streamasr.protocol",
    }


def test_the_client_loads_no_server_module():
    for module in (
        "streamasr_client.stream",
        "streamasr_client.sagemaker_stream",
        "streamasr_client.transcribe",
    ):
        server_side = {m for m in modules_after_import(module) if m.split(".")[0] == "streamasr"}
        assert server_side <= {"streamasr", "streamasr.protocol.contract", "streamasr.protocol"}, (
            module
        )


def results(text: str, final: bool) -> dict:
    return {
        "type": "Results",
        "is_final": final,
        "channel": {
            "alternatives": [
                {
                    "transcript": text,
                    "confidence": 0.5,
                    "words": [{"word": w} for w in text.split()],
                }
            ]
        },
    }


def test_result_accessors():
    msgs = [
        results("hel", False),
        results("hello there", True),
        {"type": "UtteranceEnd"},
        results("", True),
        results("general", True),
        {"type": "Error", "message": "x"},
    ]
    assert [protocol.is_results(m) for m in msgs] == [True, True, False, True, True, False]
    assert protocol.finals(msgs) == [msgs[1], msgs[3], msgs[4]]
    assert protocol.final_text(msgs) == "hello there general"  # the empty final skipped
    assert protocol.transcript(msgs[0]) == "hel"
    assert [w["word"] for w in protocol.words(msgs[1])] == ["hello", "there"]
    assert protocol.alternative(msgs[1])["confidence"] == 0.5


def test_pcm16_scaling_maps_full_scale_to_minus_one():
    pcm = np.array([0, 16384, -32768, 32767], np.int16)
    out = protocol.pcm16_to_float(pcm)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [0, 0.5, -1, 32767 / 32768], atol=1e-7)
    assert protocol.pcm16_to_float(pcm, "float64").dtype == np.float64
