"""What SageMaker's platform does to the container, checked with docker/serve run outside
Docker: where the model repository comes from (/opt/ml/model only when it holds one), the
stateful-session header SageMaker reads, InvokeEndpoint's 6 MB / 60 s limits on
/invocations, and draining within the 30 s between SIGTERM and SIGKILL (on a server of its own)."""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import re
import time
from pathlib import Path

import aiohttp
import aiohttp.test_utils
import pytest

from streamasr.protocol import NEW_SESSION_HEADER, SESSION_HEADER, WS_PATH, final_text
from streamasr.sagemaker.gateway import platform
from streamasr.sagemaker.gateway.config import GatewayConfig
from streamasr.sagemaker.gateway.http import Gateway
from streamasr.sagemaker.gateway.serve import model_repository
from streamasr_client import sagemaker_stream as sms

from ..helpers import DEMO_WAV, ROOT, Serve, copy_repository, needs_demo, post, sagemaker_env

EXPIRES = re.compile(r"^([0-9a-f]{32}); Expires=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


def image_env(tmp: Path, model_dir: Path, baked: Path) -> dict[str, str]:
    """SageMaker's environment with the image's repository layout, rooted in ``tmp``."""
    env = sagemaker_env(
        tmp, STREAMASR_SAGEMAKER_MODEL_DIR=str(model_dir), STREAMASR_BAKED_REPOSITORY=str(baked)
    )
    env.pop("STREAMASR_MODEL_REPOSITORY")
    return env


def served_repository(serve: Serve) -> str:
    """The repository tritonserver reports in its startup table."""
    m = re.search(r"model_repository_path\[0\]\s*\|\s*(\S+)", serve.log_path.read_text())
    assert m, serve.log()
    return m[1]


# -- where the repository comes from ---------------------------------------------------------


def test_model_repository_choice(tmp_path, caplog):
    model_dir, baked = tmp_path / "opt-ml-model", tmp_path / "baked"
    (baked / "m").mkdir(parents=True)
    (baked / "m" / "config.pbtxt").write_text("")
    env = {
        "STREAMASR_SAGEMAKER_MODEL_DIR": str(model_dir),
        "STREAMASR_BAKED_REPOSITORY": str(baked),
    }
    assert model_repository(env) == baked  # no /opt/ml/model at all
    model_dir.mkdir()
    assert model_repository(env) == baked  # SageMaker's empty mount
    (model_dir / "notes.txt").write_text("not a repository")
    with caplog.at_level(logging.WARNING):
        assert model_repository(env) == baked  # junk: said, and ignored
    assert "not a model repository" in caplog.text
    (model_dir / "asr").mkdir()
    (model_dir / "asr" / "config.pbtxt").write_text("")
    assert model_repository(env) == model_dir  # ModelDataUrl's repository
    assert model_repository(dict(env, STREAMASR_MODEL_REPOSITORY="/x")) == Path("/x")
    assert (
        model_repository(
            {
                "STREAMASR_SAGEMAKER_MODEL_DIR": str(tmp_path / "none"),
                "STREAMASR_BAKED_REPOSITORY": str(tmp_path / "none"),
            }
        )
        == ROOT / "model_repository"
    )  # a checkout, outside Docker


def test_serve_uses_the_baked_repository_when_model_data_is_empty(tmp_path):
    model_dir = tmp_path / "opt-ml-model"
    model_dir.mkdir()  # mounted, nothing in it
    baked = copy_repository(tmp_path / "baked", {})
    s = Serve(image_env(tmp_path, model_dir, baked), tmp_path / "serve.log")
    try:
        s.wait_ready()
        assert served_repository(s) == str(baked)
    finally:
        assert s.stop() == 0


@pytest.fixture(scope="module")
def byom(tmp_path_factory):
    """docker/serve with a repository in the model-data folder (ModelDataUrl) and none
    baked: it must serve the model data's."""
    tmp = tmp_path_factory.mktemp("byom")
    model_dir = copy_repository(tmp / "opt-ml-model", {})
    s = Serve(image_env(tmp, model_dir, tmp / "no-baked-repository"), tmp / "serve.log")
    s.model_dir = model_dir
    s.wait_ready()
    yield s
    s.stop()


def test_serve_uses_model_data_when_it_holds_a_repository(byom):
    assert served_repository(byom) == str(byom.model_dir)


# -- stateful sessions: the header SageMaker reads -------------------------------------------


@needs_demo
def test_new_session_answers_the_session_id_header(byom):
    pcm, rate = sms.read_pcm16(DEMO_WAV)
    ctype = f"audio/l16;rate={rate}"
    status, headers, _ = post(
        byom.url + "/invocations",
        pcm[: rate * 2],
        {"Content-Type": ctype, SESSION_HEADER: "NEW_SESSION"},
    )
    assert status == 200
    m = EXPIRES.match(headers.get(SESSION_HEADER, ""))
    assert m, headers  # what AWS's containers answer
    assert headers[NEW_SESSION_HEADER] == headers[SESSION_HEADER]
    status, headers, _ = post(
        byom.url + "/invocations",
        pcm[rate * 2 : rate * 4],
        {
            "Content-Type": ctype,
            SESSION_HEADER: m[1],
            "X-Amzn-SageMaker-Custom-Attributes": "close=true",
        },
    )
    assert status == 200 and headers["X-Amzn-SageMaker-Closed-Session-Id"] == m[1]


def test_client_reads_the_session_id_header(byom):
    """The request-response client takes the id from X-Amzn-SageMaker-Session-Id."""
    import urllib.request

    seen = []
    real = urllib.request.urlopen

    class Strip:  # a container answering only the platform's header
        def __init__(self, r):
            self.r, self.headers = (
                r,
                {k: v for k, v in r.headers.items() if k.lower() != NEW_SESSION_HEADER.lower()},
            )
            seen.append(self.headers)

        def read(self):
            return self.r.read()

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.r.close()

    invoke = sms.http_invoker(byom.url)
    urllib.request.urlopen = lambda *a, **kw: Strip(real(*a, **kw))
    try:
        s = sms.InvocationsSession(invoke, sms.Framing(16000))
        s.send(bytes(3200))
        assert s.session_id and len(s.session_id) == 32
        s.send(bytes(3200), close=True)
    finally:
        urllib.request.urlopen = real
    assert NEW_SESSION_HEADER not in seen[0] and s.session_id is None


# -- InvokeEndpoint limits -------------------------------------------------------------------


def _post_raw(url: str, body, headers: dict[str, str], chunked: bool = False):
    host, port = url.removeprefix("http://").split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=120)
    try:
        c.request("POST", "/invocations", body=body, headers=headers, encode_chunked=chunked)
        r = c.getresponse()
        return r.status, json.loads(r.read())
    finally:
        c.close()


def test_bodies_over_6mb_get_413_pointing_to_streaming(byom):
    big = bytes(platform.INVOKE_MAX_BODY_BYTES + 2)
    status, body = _post_raw(byom.url, big, {"Content-Type": "audio/l16;rate=16000"})
    assert status == 413 and body["code"] == "payload_too_large"
    assert "InvokeEndpointWithBidirectionalStream" in body["message"]
    assert "6 MB" in body["message"]
    # no Content-Length (chunked): measured after reading, same answer
    chunks = iter([big[: 1 << 20]] * 7)
    status, body = _post_raw(
        byom.url,
        chunks,
        {"Content-Type": "audio/l16;rate=16000", "Transfer-Encoding": "chunked"},
        chunked=True,
    )
    assert status == 413 and "bidirectional" in body["message"]


def test_invocation_deadline_stays_under_sagemakers_60s(byom, monkeypatch):
    assert platform.invoke_timeout_s({}) < platform.SAGEMAKER_INVOKE_TIMEOUT_S
    for bad in ("60", "90", "0"):
        with pytest.raises(ValueError, match="60"):
            platform.invoke_timeout_s({"STREAMASR_INVOKE_TIMEOUT": bad})
    monkeypatch.setenv("STREAMASR_INVOKE_TIMEOUT", "0.01")

    async def go():
        gw = Gateway(GatewayConfig(triton_grpc=f"127.0.0.1:{byom.grpc_port}"))
        async with aiohttp.test_utils.TestClient(aiohttp.test_utils.TestServer(gw.app())) as c:
            r = await c.post(
                "/invocations", data=DEMO_WAV.read_bytes(), headers={"Content-Type": "audio/wav"}
            )
            return r.status, await r.json()

    status, body = asyncio.run(go())
    assert status == 504 and body["code"] == "timeout" and "60 s" in body["message"]


def test_shutdown_budget_fits_sagemakers_30s():
    total = platform.DRAIN_S + platform.HANDLER_SHUTDOWN_S + platform.TRITON_EXIT_S + 2
    assert total < platform.SAGEMAKER_KILL_AFTER_S


# -- SIGTERM (conftest.own_serve: the test stops its server) -----------------------------------


@needs_demo
def test_sigterm_drains_open_streams_within_30s(own_serve):
    """A stream is mid-utterance when SageMaker sends SIGTERM: the client still gets the
    final of what it sent, then close 1001, and the container is gone well before the
    SIGKILL that follows 30 s after SIGTERM."""
    pcm, rate = sms.read_pcm16(DEMO_WAV)
    half = pcm[: len(pcm) // 2 // 2 * 2]

    async def go():
        after: list[dict] = []
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"{own_serve.url}{WS_PATH}?sample_rate={rate}") as ws:
                step = rate // 10 * 2
                for i in range(0, len(half), step):
                    await ws.send_bytes(half[i : i + step])
                while True:  # mid-utterance: an interim already shows some of the speech
                    m = await ws.receive(timeout=60)
                    assert m.type == aiohttp.WSMsgType.TEXT, m
                    alts = json.loads(m.data).get("channel", {}).get("alternatives", [{}])
                    if alts[0].get("transcript"):
                        break
                t0 = time.monotonic()
                own_serve.proc.send_signal(15)
                async for m in ws:
                    if m.type == aiohttp.WSMsgType.TEXT:
                        after.append(json.loads(m.data))
                return ws.close_code, after, t0

    code, after, t0 = asyncio.run(go())
    rc = own_serve.proc.wait(timeout=platform.SAGEMAKER_KILL_AFTER_S)
    elapsed = time.monotonic() - t0
    assert code == platform.GOING_AWAY
    assert final_text(after), f"no final after SIGTERM: {after[-3:]}"
    assert rc == 0 and elapsed < platform.SAGEMAKER_KILL_AFTER_S, (rc, elapsed, own_serve.log())
