"""What SageMaker's platform imposes on the container, in one place: InvokeEndpoint's body
and time limits on ``/invocations``, and the shutdown budget after SIGTERM.

* InvokeEndpoint carries at most 6 MB and SageMaker cuts a request at 60 s (AWS API
  reference, InvokeEndpoint; SageMaker developer guide, "How containers serve requests").
  Larger bodies are refused here with 413 and a message that points to the streaming
  routes; a request still running after ``INVOKE_TIMEOUT_S`` (under 60 s, so the client
  gets our reason instead of the platform's generic timeout) is answered with 504.
* On SIGTERM SageMaker waits 30 s, then kills the container (developer guide, "Use Your Own
  Inference Code with Hosting Services").  ``drain`` ends every open WebSocket stream within
  ``DRAIN_S``: END goes to Triton, the results of the open utterance still reach the client,
  then the socket closes with 1001 (going away) so the client reconnects elsewhere.
  docker/serve then gives Triton ``TRITON_EXIT_S``; the sum stays under the 30 s.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from aiohttp import web

from streamasr.protocol import INVOCATIONS_PATH

if TYPE_CHECKING:
    from streamasr.sagemaker.gateway.ws import WsSession

log = logging.getLogger("streamasr.platform")

# InvokeEndpoint's payload limit (6 MB = 6 * 1024 * 1024 bytes).
INVOKE_MAX_BODY_BYTES = 6 * 1024 * 1024
# SageMaker's InvokeEndpoint limit; our own must stay below it.
SAGEMAKER_INVOKE_TIMEOUT_S = 60.0
INVOKE_TIMEOUT_S = 55.0
# SIGTERM -> SIGKILL on SageMaker.
SAGEMAKER_KILL_AFTER_S = 30.0
# Budget after SIGTERM: streams drained, then handlers still running, then Triton.
DRAIN_S = 10.0
HANDLER_SHUTDOWN_S = 5.0
TRITON_EXIT_S = 8
# Close code for streams ended by a shutdown (RFC 6455: endpoint going away).
GOING_AWAY = 1001

STREAMING_HINT = (
    "stream it instead: InvokeEndpointWithBidirectionalStream (the container's "
    "/invocations-bidirectional-stream WebSocket route), or InvokeEndpoint in a "
    "stateful session (X-Amzn-SageMaker-Session-Id) with chunks under the limit"
)


def invoke_timeout_s(env=None) -> float:
    e = os.environ if env is None else env
    t = float(e.get("STREAMASR_INVOKE_TIMEOUT", INVOKE_TIMEOUT_S))
    if not 0 < t < SAGEMAKER_INVOKE_TIMEOUT_S:
        raise ValueError(
            f"STREAMASR_INVOKE_TIMEOUT={t}: must be above 0 and under "
            f"SageMaker's {SAGEMAKER_INVOKE_TIMEOUT_S:.0f} s InvokeEndpoint limit"
        )
    return t


#: Where the middleware leaves a chunked body it had to read to measure (the gateway's
#: body reader takes it from there instead of the exhausted stream).
READ_BODY_KEY = "streamasr.read_body"
BODY_READ_BYTES = 64 * 1024


def _too_large(size: int, limit: int) -> web.Response:
    return web.json_response(
        {
            "type": "Error",
            "code": "payload_too_large",
            "message": f"request body of {size} bytes is over SageMaker's InvokeEndpoint limit "
            f"of {limit} bytes (6 MB); {STREAMING_HINT}",
        },
        status=413,
    )


def invocation_limits(max_body_bytes: int = INVOKE_MAX_BODY_BYTES, timeout_s: float | None = None):
    """aiohttp middleware: the 6 MB body limit and the < 60 s deadline on /invocations."""
    timeout_s = invoke_timeout_s() if timeout_s is None else timeout_s

    @web.middleware
    async def middleware(request: web.Request, handler):
        if request.path != INVOCATIONS_PATH or request.method != "POST":
            return await handler(request)
        if request.content_length is not None and request.content_length > max_body_bytes:
            log.info(
                "invocations: refused a %d-byte body (limit %d)",
                request.content_length,
                max_body_bytes,
            )
            return _too_large(request.content_length, max_body_bytes)

        async def read_and_handle() -> web.StreamResponse:
            if request.content_length is None:  # chunked: read in pieces, stop at the limit
                parts, size = [], 0
                async for part in request.content.iter_chunked(BODY_READ_BYTES):
                    size += len(part)
                    if size > max_body_bytes:
                        log.info(
                            "invocations: refused a chunked body over %d bytes", max_body_bytes
                        )
                        resp = _too_large(size, max_body_bytes)
                        resp.force_close()  # do not read the rest
                        return resp
                    parts.append(part)
                request[READ_BODY_KEY] = b"".join(parts)  # the handler takes it from here
            return await handler(request)

        # The deadline covers reading the body too: a client trickling its body holds a
        # connection and its buffer no longer than an answer may take.
        try:
            return await asyncio.wait_for(read_and_handle(), timeout_s)
        except ConnectionResetError:  # the client went away mid-body: nobody to answer
            log.info("invocations: client disconnected before its body was read")
            resp = web.Response(status=400)
            resp.force_close()
            return resp
        except asyncio.TimeoutError:
            log.warning("invocations: no answer after %.0f s; gave up", timeout_s)
            resp = web.json_response(
                {
                    "type": "Error",
                    "code": "timeout",
                    "message": f"no result after {timeout_s:.0f} s (SageMaker ends InvokeEndpoint "
                    f"calls at {SAGEMAKER_INVOKE_TIMEOUT_S:.0f} s): send shorter audio "
                    f"or {STREAMING_HINT}",
                },
                status=504,
            )
            resp.force_close()  # the body may be unread: do not keep the connection
            return resp

    return middleware


async def _drain_stream(ws_session: "WsSession", deadline: float) -> None:
    ws_session.draining = True  # audio still queued in the socket is dropped
    s = ws_session.session
    try:
        if s is not None and not s.closed and s.started:
            s.close(ws_session.take_buffered_audio())  # END: the open utterance's final
            await asyncio.to_thread(s.wait, max(0.0, deadline - time.monotonic()))
            # the last results are on their way to the socket: let the writer send them
            while (
                time.monotonic() < deadline
                and not ws_session.ws.closed
                and (ws_session.received < len(s.messages) or not ws_session.out.empty())
            ):
                await asyncio.sleep(0.01)
    except Exception as exc:  # a stream that fails to drain still gets closed
        log.warning("ws %s: drain: %s", ws_session.id, exc)
    if not ws_session.ws.closed:
        await ws_session.ws.close(code=GOING_AWAY, message=b"server shutting down")


async def drain(ws_sessions: "Iterable[WsSession]", budget_s: float = DRAIN_S) -> None:
    """End every open WebSocket stream within ``budget_s`` (see the module doc)."""
    streams = list(ws_sessions)
    if not streams:
        return
    log.info("shutdown: draining %d open stream(s) within %.0f s", len(streams), budget_s)
    deadline = time.monotonic() + budget_s
    done, pending = await asyncio.wait(
        [asyncio.create_task(_drain_stream(w, deadline)) for w in streams], timeout=budget_s + 1.0
    )
    for t in pending:
        t.cancel()
    log.info("shutdown: %d stream(s) drained, %d cut", len(done), len(pending))


def install(app: web.Application, ws_sessions: "Iterable[WsSession]") -> None:
    """Hook the limits and the drain into the gateway's application; ``ws_sessions``: the
    gateway's live collection of open WebSocket sessions, read at shutdown."""
    app.middlewares.append(invocation_limits())

    async def _drain(_app) -> None:
        await drain(ws_sessions)

    # before the gateway's own shutdown hook, which closes the connection to Triton
    app.on_shutdown.insert(0, _drain)
