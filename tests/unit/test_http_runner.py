"""A client that half-closes (sends its request, then shuts its sending side: `nc -N`,
``socket.shutdown(SHUT_WR)``) gets its answer; aiohttp closed the connection on that EOF
and dropped every answer, even an instant one (aiohttp#3659; session 16's probe, O1).

Where the end of the client's stream means it gave up (a call that costs money, in
progress), it still aborts the call, as before.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable

import pytest
from aiohttp import web

from app.http.runner import _JsonErrorsHandler, serve_app
from tests.integration.harness import free_port


async def _echo(request: web.Request) -> web.Response:
    body = await request.read()
    return web.json_response({"bytes": len(body)})


async def _ok(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


class _Slow:
    """A route that costs money: it waits (as a call waits for room under a cap) until its
    client is gone, as the dispatcher's budget gate checks (``SseClient.gone``)."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.saw_client_gone = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        self.started.set()
        for _ in range(500):
            transport = request.transport
            if transport is None or transport.is_closing():
                self.saw_client_gone.set()
                break
            await asyncio.sleep(0.01)
        return web.json_response({"served": True})


@pytest.fixture
async def served() -> AsyncIterator[tuple[int, _Slow]]:
    slow = _Slow()
    app = web.Application()
    app.router.add_get("/ok", _ok)
    app.router.add_post("/echo", _echo)
    app.router.add_post("/paid", slow.handle)
    port = free_port()
    runner = await serve_app(
        app, "127.0.0.1", port, eof_aborts=lambda request: request.path == "/paid"
    )
    try:
        yield port, slow
    finally:
        await runner.cleanup()


def _exchange(port: int, raw: bytes, half_close: bool = True) -> bytes:
    """Send ``raw``, shut the sending side, read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(raw)
        if half_close:
            conn.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
        return answer


async def _in_thread(fn: Callable[..., bytes], *args: object) -> bytes:
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


def _responses(answer: bytes) -> list[tuple[int, dict[str, object]]]:
    """(status, JSON body) of each response in ``answer`` (Content-Length framed)."""
    out = []
    while answer:
        head, _, rest = answer.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
        length = int(headers["content-length"])
        out.append((status, json.loads(rest[:length])))
        answer = rest[length:]
    return out


async def test_a_half_closed_request_is_answered_then_the_connection_closes(
    served: tuple[int, _Slow],
) -> None:
    port, _ = served
    for _ in range(5):  # an instant answer was dropped every time
        answer = await _in_thread(_exchange, port, b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _responses(answer) == [(200, {"status": "ok"})]
    body = b'{"hello": "world"}'
    raw = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    assert _responses(await _in_thread(_exchange, port, raw)) == [(200, {"bytes": len(body)})]


async def test_pipelined_requests_then_a_half_close_are_all_answered(
    served: tuple[int, _Slow],
) -> None:
    port, _ = served
    raw = (
        b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
        b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    answer = await _in_thread(_exchange, port, raw)
    assert [status for status, _ in _responses(answer)] == [200, 200, 200]


@pytest.mark.parametrize(
    "raw",
    [
        b'POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"a": ',
        b'POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{"a":\r\n',
    ],
    ids=["content-length", "chunked"],
)
async def test_a_body_cut_short_by_a_half_close_is_a_400_saying_so(
    served: tuple[int, _Slow], raw: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    port, _ = served
    caplog.set_level(logging.WARNING)
    [(status, body)] = _responses(await _in_thread(_exchange, port, raw))
    # aiohttp logs as it drains the body after the answer, before it closes: logged by now
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]  # the client's error: a WARNING
    assert status == 400
    error = body["error"]
    assert isinstance(error, dict) and error["type"] == "invalid_request_error"
    assert "before the whole body" in str(error["message"]), error


async def test_the_end_of_the_stream_still_means_gone_during_a_paid_call(
    served: tuple[int, _Slow],
) -> None:
    """The client closing (or half-closing) while a call that costs money runs means it
    gave up, as before: the connection closes, so the call sees its client gone (a call
    waiting for room under a cap leaves the line instead of being made for nobody)."""
    port, slow = served
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /paid HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
    await writer.drain()
    await asyncio.wait_for(slow.started.wait(), 10)
    writer.write_eof()
    await asyncio.wait_for(slow.saw_client_gone.wait(), 10)
    assert await reader.read() == b""  # no answer: nobody asked any more
    writer.close()


async def test_an_idle_connection_closed_by_the_client_is_closed(
    served: tuple[int, _Slow],
) -> None:
    port, _ = served
    answer = await _in_thread(_exchange, port, b"")
    assert answer == b""
    answer = await _in_thread(_exchange, port, b"GET /ok HTT")  # half a request line
    assert answer == b"" or answer.startswith(b"HTTP/1.1 400")


@pytest.fixture
async def impatient() -> AsyncIterator[int]:
    """A server that waits 0.3 s at most for the head of a connection's first request."""
    app = web.Application()
    app.router.add_get("/ok", _ok)
    port = free_port()
    runner = await serve_app(app, "127.0.0.1", port, head_timeout_s=0.3)
    try:
        yield port
    finally:
        await runner.cleanup()


def _read_all(port: int, raw: bytes, trickle: bytes = b"") -> bytes:
    """Send ``raw``, then ``trickle`` a byte every 0.05 s, and read until the server closes
    (a server that never does fails the read's 20 s timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as conn:
        conn.sendall(raw)
        for byte in trickle:
            try:
                conn.sendall(bytes([byte]))
            except OSError:
                break  # closed by the server
            time.sleep(0.05)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
        return answer


@pytest.mark.parametrize(
    ("raw", "trickle"),
    [
        (b"GET /ok HTT", b""),  # half a request line
        (b"GET /ok HTTP/1.1\r\nX-A: ", b"x" * 400),  # a header trickled a byte at a time
    ],
    ids=["partial-line", "trickled-header"],
)
async def test_a_request_head_that_never_arrives_whole_is_a_408(
    impatient: int, raw: bytes, trickle: bytes
) -> None:
    """Session 17's probe (F5): the body had a timeout, the head none: a connection sending
    half a request line, or a header a byte a second, was held open for good."""
    answer = await _in_thread(_read_all, impatient, raw, trickle)
    [(status, body)] = _responses(answer)
    assert status == 408
    assert b"\r\nX-Request-Id: req_" in answer  # as every answer (session 17's third probe)
    error = body["error"]
    assert isinstance(error, dict) and error["type"] == "request_timeout", error


async def test_a_connection_that_sends_nothing_is_closed(impatient: int) -> None:
    assert await _in_thread(_read_all, impatient, b"") == b""


async def test_a_chat_body_of_many_messages_is_parsed_off_the_event_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Session 17's probe (F15): 120,000 one-character messages held the event loop for
    0.56 s while they were validated and estimated; past 2,000 messages that is done in a
    thread (the loop then waits at most for pydantic's part, 0.17 s there)."""
    import threading

    import app.http.server as server

    seen: list[bool] = []
    parse = server.parse_chat_request

    def recording(*args: object, **kwargs: object) -> object:
        seen.append(threading.current_thread() is threading.main_thread())
        return parse(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(server, "parse_chat_request", recording)
    few = {"model": "gpt-4o", "messages": [{"role": "user", "content": "a"}] * 10}
    many = {"model": "gpt-4o", "messages": [{"role": "user", "content": "a"}] * 5_000}
    assert (await server.parse_chat_body(few, None, False)).model == "gpt-4o"
    assert (await server.parse_chat_body(many, None, False)).prompt_tokens_estimate > 5_000
    assert seen == [True, False]


def _after_one_request(port: int, then: bytes) -> bytes:
    """A whole request and its answer, then ``then`` (half of the next head), then wait for
    the server to answer or close (a server that never does fails the 20 s read timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as conn:
        conn.sendall(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
        first = b""
        while b'"ok"}' not in first:
            first += conn.recv(65536)
        conn.sendall(then)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
        return answer


async def test_a_later_request_head_that_never_arrives_whole_is_a_408_too(impatient: int) -> None:
    """Session 17's third probe: the head timeout covered a connection's first request only,
    and aiohttp's keep-alive timeout does not close a connection holding part of a head: one
    cheap request, then half a request line, held the connection for good."""
    answer = await _in_thread(_after_one_request, impatient, b"GET /hea")
    [(status, body)] = _responses(answer)
    assert status == 408
    error = body["error"]
    assert isinstance(error, dict) and error["type"] == "request_timeout", error


class _AfterTheEnd:
    """A route that reads its body only once the server has seen the end of the client's
    stream (as a route whose middleware awaits before it reads): the order of the two is
    then the same on every run, however busy the machine."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.started = asyncio.Event()
        self.eof_seen = asyncio.Event()
        eof_received = _JsonErrorsHandler.eof_received

        def seen(handler: _JsonErrorsHandler) -> bool | None:
            try:
                return eof_received(handler)
            finally:
                self.eof_seen.set()

        monkeypatch.setattr(_JsonErrorsHandler, "eof_received", seen)

    async def handle(self, request: web.Request) -> web.Response:
        self.started.set()
        await self.eof_seen.wait()
        return await _echo(request)


_GZIP_HEAD = (
    b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Encoding: gzip\r\nContent-Length: 5\r\n\r\n"
)


async def _undecodable_exchange(port: int, when: str, after_the_end: _AfterTheEnd) -> bytes:
    """Send a whole 5-byte body that is not gzip, declared gzip; end the stream ``when``."""
    if when == "no-half-close":  # the route reads the body (and fails) before any end
        return await _in_thread(_exchange, port, _GZIP_HEAD + b"hello", False)
    if when == "before-the-route-runs":
        # Sent from the event loop's own thread: the server reads nothing until request and
        # end of stream are both there; it then sees the end after it took the request from
        # its queue, before the route's task runs (Python 3.11: tasks do not start eagerly)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.sendall(_GZIP_HEAD + b"hello")
            conn.shutdown(socket.SHUT_WR)

            def read_all() -> bytes:
                answer = b""
                while chunk := conn.recv(65536):
                    answer += chunk
                return answer

            return await _in_thread(read_all)
    # while the route waits, before it reads: "he" already does not decode as gzip; with
    # "split" the rest ("llo") is sent after the parser failed on it, then the end
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    first = b"he" if when == "while-the-route-waits, split" else b"hello"
    writer.write(_GZIP_HEAD.replace(b"/echo", b"/echo-after-the-end") + first)
    await writer.drain()
    await asyncio.wait_for(after_the_end.started.wait(), 10)  # the head and first are read
    writer.write(b"hello"[len(first) :])
    writer.write_eof()
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return answer


@pytest.mark.parametrize(
    "when",
    [
        "no-half-close",
        "before-the-route-runs",
        "while-the-route-waits",
        "while-the-route-waits, split",
    ],
)
async def test_an_undecodable_body_is_told_it_does_not_decode_whenever_the_stream_ends(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, when: str
) -> None:
    """Session 17's third probe: a whole gzip body that does not decode, then a half-close,
    was told its body was cut short. This probe: what it was told hung on which the server
    saw first, the end of the stream or the route reading the body, a race a busy machine
    lost: a route that let the parser's error through answered 500 "internal_error" (logged
    as "answered 400"); a body whose first part already failed, the rest and the end then
    arriving before the route read it, was told it was cut short; one read after the end
    named its Content-Encoding '' and llhttp's "Span callback error in on_body". It is a
    400 naming the encoding, whenever the stream ends, for any route."""
    after_the_end = _AfterTheEnd(monkeypatch)
    app = web.Application()
    app.router.add_post("/echo", _echo)
    app.router.add_post("/echo-after-the-end", after_the_end.handle)
    port = free_port()
    runner = await serve_app(app, "127.0.0.1", port)
    try:
        caplog.set_level(logging.WARNING)
        answer = await _undecodable_exchange(port, when, after_the_end)
    finally:
        await runner.cleanup()
    [(status, body)] = _responses(answer)
    error = body["error"]
    assert isinstance(error, dict), body
    assert (status, error["type"]) == (400, "invalid_request_error"), error
    assert str(error["message"]).startswith(
        "The request body could not be decoded as its Content-Encoding ('gzip') says: "
        "Can not decode content-encoding: gzip."
    ), error
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]  # the client's error: a WARNING


async def test_a_paid_calls_body_cut_short_by_a_later_half_close_is_a_400(
    served: tuple[int, _Slow],
) -> None:
    """Session 17's third probe: the end of the stream on a paid route was taken as the
    client giving up as soon as its handler had started, even while it was still waiting
    for the body (nothing admitted, nothing sent upstream): no answer at all, unless head,
    partial body and FIN arrived together. A body still arriving is cut short: a 400."""
    port, _ = served

    def send_then_half_close() -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=20) as conn:
            conn.sendall(b'POST /paid HTTP/1.1\r\nHost: x\r\nContent-Length: 300\r\n\r\n{"a":')
            time.sleep(0.5)  # the handler is reading the body by now (no timing is asserted)
            conn.shutdown(socket.SHUT_WR)
            answer = b""
            while chunk := conn.recv(65536):
                answer += chunk
            return answer

    [(status, body)] = _responses(await _in_thread(send_then_half_close))
    assert status == 400
    assert "before the whole body" in str(body["error"]), body


def _answer_head(answer: bytes) -> tuple[str, dict[str, str], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines)}
    return status_line, headers, body


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),  # no request line
        (b"GET /ok HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n", 400),
        (b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", 400),
        (
            b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n",
            400,
        ),
        (b"GET /ok HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 70_000 + b"\r\n\r\n", 431),
        (b"GET /ok HTTP/1.1\r\n" + b"".join(b"X-%d: a\r\n" % i for i in range(200)) + b"\r\n", 431),
        (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
    ],
    ids=["request-line", "header", "content-length", "chunk-size", "long-header", "headers", "url"],
)
async def test_an_unparsable_request_is_answered_in_http_1_1_and_json_then_closed(
    served: tuple[int, _Slow], raw: bytes, status: int, caplog: pytest.LogCaptureFixture
) -> None:
    """This probe (session 22): aiohttp answered what its parser rejects as ``HTTP/1.0``
    (its placeholder request's version) without ``Connection: close``, and a header past the
    limit, or too many of them, as a plain 400; a client speaking HTTP/1.1 is answered in
    HTTP/1.1, the status names what is too large, and the connection is closed."""
    port, _ = served
    answer = await _in_thread(_exchange, port, raw, False)
    status_line, headers, body = _answer_head(answer)
    assert status_line.startswith(f"HTTP/1.1 {status} "), status_line
    assert headers["connection"] == "close"
    assert headers["content-type"].startswith("application/json")
    assert headers["x-request-id"].startswith("req_")
    error = json.loads(body)["error"]
    assert error["type"] == ("request_too_large" if status != 400 else "invalid_request_error")
    if status != 400:  # the limit the client must keep to
        assert "65,536" in error["message"] or "128 headers" in error["message"], error
    logged = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert all(r.levelno == logging.WARNING for r in logged)  # a bad method: DEBUG, unseen
    assert all(f"answered {status}:" in r.getMessage() for r in logged), logged


async def test_an_agents_metrics_listener_answers_an_unparsable_request_in_json(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """This probe (session 22): the agents' /metrics listeners (anomaly, router learner,
    notifier) ran on aiohttp's own runner and answered a request its parser rejects in plain
    text; they answer in the API's JSON error shape, as the dispatcher does."""
    from prometheus_client import CollectorRegistry

    from app.http.agent_metrics import metrics_listener

    port = free_port()
    async with metrics_listener(CollectorRegistry(), "127.0.0.1", port, name="test") as bound:
        assert bound == port
        raw = b"GET /metrics HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n"
        status_line, headers, body = _answer_head(await _in_thread(_exchange, port, raw, False))
        assert status_line.startswith("HTTP/1.1 400 "), status_line
        assert headers["content-type"].startswith("application/json")
        assert json.loads(body)["error"]["type"] == "invalid_request_error"
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert errors == [], [r.getMessage() for r in errors]  # the client's error: a WARNING
        ok = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        assert _responses(await _in_thread(_exchange, port, ok)) == [(200, {"status": "ok"})]


async def test_an_unknown_route_or_method_is_named_with_what_is_served(
    served: tuple[int, _Slow],
) -> None:
    """This probe (session 22): the sink's reports server and the agents' listeners answered
    an unknown path ``{"type": "invalid_request_error", "message": "404: Not Found"}`` and a
    wrong method "405: Method Not Allowed" without its Allow header: nothing to act on. They
    name the routes served, as the dispatcher does."""
    port, _ = served
    raw = b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n"
    [(status, body)] = _responses(await _in_thread(_exchange, port, raw))
    error = body["error"]
    assert isinstance(error, dict)
    assert (status, error["type"]) == (404, "not_found"), error
    assert "GET /nope" in str(error["message"]) and "POST /echo" in str(error["message"]), error
    answer = await _in_thread(_exchange, port, b"DELETE /ok HTTP/1.1\r\nHost: x\r\n\r\n")
    _, headers, _ = _answer_head(answer)
    [(status, body)] = _responses(answer)
    assert status == 405 and headers["allow"] == "GET,HEAD", headers
    assert "use GET" in str(body["error"]), body


async def test_a_bad_deflate_body_arriving_before_its_request_is_current_is_a_400(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The CI of session 41 saw a 408 for `{"a":1}` sent as deflate after its head: aiohttp
    takes a request off its queue and makes it current only in a new task's first step, a
    loop iteration later on Python 3.11; a body arriving in between was in neither place, so
    its parser error was answered as a request of its own and the route waited for the body.
    Here that window is held open until the body has arrived."""
    import threading

    head_seen, body_seen = threading.Event(), asyncio.Event()
    received, handle = _JsonErrorsHandler.data_received, _JsonErrorsHandler._handle_request

    def seen(self: _JsonErrorsHandler, data: bytes) -> None:
        received(self, data)
        head_seen.set()
        if data.endswith(b'{"a":1}'):
            body_seen.set()

    async def late(self: _JsonErrorsHandler, *args: object) -> object:
        await body_seen.wait()  # the request is off the queue, not yet current
        return await handle(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(_JsonErrorsHandler, "data_received", seen)
    monkeypatch.setattr(_JsonErrorsHandler, "_handle_request", late)
    app = web.Application()
    app.router.add_post("/echo", _echo)
    port = free_port()
    runner = await serve_app(app, "127.0.0.1", port)

    def exchange() -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.sendall(
                b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Encoding: deflate\r\nContent-Length: 7\r\n\r\n"
            )
            assert head_seen.wait(10), "the head was not read"
            conn.sendall(b'{"a":1}')
            answer = b""
            while b"\r\n\r\n" not in answer:  # a socket timeout here: the route still waits
                chunk = conn.recv(65536)
                assert chunk, answer
                answer += chunk
            head, _, rest = answer.partition(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            while len(rest) < length:
                rest += conn.recv(65536)
            return head + b"\r\n\r\n" + rest

    try:
        answer = await _in_thread(exchange)
    finally:
        await runner.cleanup()
    [(status, body)] = _responses(answer)
    error = body["error"]
    assert isinstance(error, dict), body
    assert status == 400 and "Content-Encoding ('deflate')" in str(error["message"]), body
