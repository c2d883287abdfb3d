"""Serving an aiohttp application so that what aiohttp answers by itself is in the API's
JSON error shape too (``{"error": {"type", "message", ...}}``), for the dispatcher and the
sink's reports server alike (:func:`serve_app`).

aiohttp answers some requests before any route or middleware runs, in plain text: one its
parser cannot frame (a bad Content-Length, chunk size, header line or method; a line past
its limit, 8,190 bytes by default), and an ``Expect`` header other than ``100-continue``
(a 417). A client had no ``error.type`` to act on (newcomer probes, sessions 13 and 16).

It also answers a client that half-closes: one that sends its request and then shuts its
sending side (``nc -N``, ``socket.shutdown(SHUT_WR)``). aiohttp closed the connection on
that end of stream and dropped every answer, even an instant one (aiohttp#3659; session 16's
probe). Only where the end of the stream means the client gave up on a call that costs money
and is already running (``eof_aborts``) is the call still aborted, as nginx and Go's server
do: a client that closes its socket and one that only shuts its sending side look the same
on the wire.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from email.utils import formatdate
from typing import Any

import orjson
from aiohttp import HttpVersion11, compression_utils, web
from aiohttp.helpers import set_exception
from aiohttp.http_exceptions import (
    BadHttpMessage,
    ContentEncodingError,
    ContentLengthError,
    HttpProcessingError,
    LineTooLong,
    PayloadEncodingError,
    TransferEncodingError,
)
from aiohttp.web_protocol import ERROR, RequestHandler, RequestPayloadError, _ErrInfo

from app.http.errors import ApiError
from app.metering.usage import new_id

# Request line and header limit: up to it they reach the routes, which name the field.
MAX_LINE_BYTES = 65_536

# Longest wait for the head (request line and headers) of a connection's first request;
# later ones are bounded by aiohttp's keep-alive timeout (75 s). Session 17's probe held
# connections open for good with half a request line, or a header a byte a second.
HEAD_TIMEOUT_S = 30.0

# The request an answer to what the parser rejects is made for: aiohttp's placeholder says
# HTTP/1.0, so the answer's status line did; this one says HTTP/1.1 (the answer still closes).
_UNPARSED = ERROR._replace(version=HttpVersion11)

# Whether the end of the client's stream, arriving while ``request`` is handled, means the
# client gave up on it (abort it) rather than that it has sent all it will (answer it).
EofAborts = Callable[[web.BaseRequest], bool]


class UnreadableBody(web.HTTPBadRequest):
    """A request body that cannot be read whole once the client has half-closed; raised by
    ``request.read()`` and the like (a 400, in JSON). ``detail`` says what to fix."""

    def __init__(self, detail: str) -> None:
        self.detail = detail
        super().__init__(text=detail)


class BodyCutShort(UnreadableBody):
    """The client ended its stream before the body it declared had arrived."""

    def __init__(self, detail: str) -> None:
        super().__init__(
            f"The request body ended before the whole body arrived ({detail.rstrip('.')}): "
            "the client closed its sending side. Send as many bytes as Content-Length says, "
            "or end a chunked body with its last (zero-size) chunk."
        )


# The content codings aiohttp's parser decodes (one a body, by name in any case; it reads a
# body of any other coding, or of a list of codings, as it is: probe 56 saw `foo` served as
# plain JSON); `br` needs the Brotli package (a dependency), `zstd` backports.zstd on
# Python < 3.14 (clickhouse-connect's) and aiohttp 3.12 or later.
DECODED_CODINGS = (
    "gzip",
    "deflate",
    *(("br",) if getattr(compression_utils, "HAS_BROTLI", False) else ()),
    *(("zstd",) if getattr(compression_utils, "HAS_ZSTD", False) else ()),
)
# A JSON body is UTF-8 (RFC 8259 section 8.1); US-ASCII is a subset of it.
READ_CHARSETS = frozenset({"utf-8", "utf8", "us-ascii", "ascii"})


def unread_body_format(request: web.BaseRequest) -> ApiError | None:
    """A 415 (RFC 9110 section 15.5.16) for a request body this server would misread: a
    ``Content-Encoding`` it does not decode (the parser reads such a body as plain), or a
    ``charset`` other than UTF-8 (it is read as UTF-8 JSON); else None. Checked before the
    body is read, so such a call reaches no provider and is charged nothing."""
    codings = ", ".join(request.headers.getall("Content-Encoding", ()))
    if codings.strip().lower() not in ("", "identity", *DECODED_CODINGS):
        return ApiError(
            415,
            "unsupported_media_type",
            f"Content-Encoding {codings[:60]!r} is not one this server decodes: send the "
            f"body plain, or encoded with one of {', '.join(DECODED_CODINGS)} (one coding)",
            param="Content-Encoding",
        )
    charset = request.charset
    if charset is not None and charset.strip().lower() not in READ_CHARSETS:
        return ApiError(
            415,
            "unsupported_media_type",
            f"Content-Type says charset={charset[:40]!r}: request bodies are JSON, which is "
            "UTF-8 (RFC 8259); send the body as UTF-8, with charset=utf-8 or no charset",
            param="Content-Type",
        )
    return None


def undecodable(exc: BaseException, encoding: str) -> str:
    """The 400's message for a body that is not what its Content-Encoding says (``exc``, the
    parser's error). aiohttp checks that a deflate body ends its stream only at the body's end
    and then says just "deflate" (probe 46: `{"a":1}` does not fail sooner). A body whose
    framing breaks (a chunk size that is not hex, after the head was read) is told so."""
    detail = str(getattr(exc, "message", None) or exc or type(exc).__name__)
    if isinstance(exc, BadHttpMessage) and not isinstance(exc, PayloadEncodingError):
        detail = " ".join(detail.split())[:200]
        return (
            f"The request body is not valid HTTP/1.1 and was not read: {detail}. Frame it by "
            "a numeric Content-Length or by chunked encoding (hex chunk sizes), not both."
        )
    if isinstance(exc, ContentEncodingError) and detail == encoding:
        detail = f"Can not decode content-encoding: {encoding} (its data stops mid-stream)"
    return (
        f"The request body could not be decoded as its Content-Encoding ({encoding[:40]!r}) "
        f"says: {detail[:200]}. Send it plain or encoded as declared "
        f"({', '.join(DECODED_CODINGS)})"
    )


def _unreadable(exc: HttpProcessingError, encoding: str) -> UnreadableBody:
    """What the parser's end of a half-closed stream means for the body it was reading:
    cut short, or (whole but) not decodable as its Content-Encoding says."""
    if isinstance(exc, ContentLengthError | TransferEncodingError):
        return BodyCutShort(str(exc.message))
    return UnreadableBody(undecodable(exc, encoding))


def _encoding_of(exc: ContentEncodingError) -> str:
    """The encoding aiohttp's decoding error names ("deflate", or "Can not decode
    content-encoding: gzip"): the request it is answered for has no headers."""
    message = str(exc.message)
    named = re.search(r"content-encoding: ([\w-]+)", message, re.IGNORECASE)
    return named.group(1) if named else message if message.isalpha() else ""


def _json_error(error: ApiError) -> web.Response:
    """The error as the API answers it, with a request id as every answer has (session 17's
    probe: the parser's 400s and the 417 had none)."""
    return web.Response(
        body=orjson.dumps(error.body()),
        status=error.status,
        content_type="application/json",
        headers={"X-Request-Id": new_id("req_")},
    )


class _UnparsableAsWarning(logging.Filter):
    """aiohttp logs a request it cannot parse (a line or header past the limit, broken
    framing) at ERROR with a traceback, then answers 400: the client's error, so a WARNING
    line (session 13's probe found the traceback)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, RequestPayloadError) and isinstance(exc.__cause__, BadHttpMessage):
            # A body that does not decode as its Content-Encoding says: answered 400, then
            # aiohttp reads the rest of it and logs "Unhandled exception" (session 17's probe)
            exc = exc.__cause__
        if isinstance(exc, UnreadableBody):  # the same, for a body read after a half-close
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg, record.args = "request body not read whole, answered 400: %s", (exc.detail,)
            record.exc_info = record.exc_text = None
        elif isinstance(exc, BadHttpMessage):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg = "request could not be parsed, answered %s: %s (%s)"
            status = _oversize_status(exc) or exc.code
            record.args = (status, type(exc).__name__, str(exc.message)[:200])
            record.exc_info = record.exc_text = None
        return True


def quiet_unparsable_requests() -> None:
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _UnparsableAsWarning) for f in server_log.filters):
        server_log.addFilter(_UnparsableAsWarning())


def _oversize_status(exc: BaseException | None) -> int | None:
    """414 or 431 for a request line or headers past the parser's limits (aiohttp answers 400
    for all three), else None. The parser raises the same :class:`LineTooLong` for the request
    target and for a header: it holds the target it was reading in a ``bytearray``, a header
    in ``bytes`` (aiohttp's C parser, the one its wheels ship; with the pure-Python parser a
    long target is a 431 too)."""
    if isinstance(exc, LineTooLong):
        return 414 if isinstance(exc.args[0], bytearray) else 431
    if isinstance(exc, BadHttpMessage) and "too many headers" in str(exc.message).lower():
        return 431
    return None


def _too_large(exc: BaseException | None, max_bytes: int, max_headers: int) -> ApiError | None:
    """The error for a request line or headers past the parser's limits, or None."""
    status = _oversize_status(exc)
    if status == 414:
        message = f"The request target (path and query) is longer than {max_bytes:,} bytes"
        return ApiError(414, "request_too_large", f"{message}: send a shorter URL.")
    if status == 431 and isinstance(exc, LineTooLong):
        message = f"A header is longer than {max_bytes:,} bytes (name and value)"
        return ApiError(431, "request_too_large", f"{message}: send it shorter.")
    if status == 431:
        message = f"The request has more than {max_headers} headers, the most it may have"
        return ApiError(431, "request_too_large", f"{message}: send fewer.")
    return None


class _JsonErrorsHandler(RequestHandler):
    """aiohttp's connection handler, answering what it answers itself in JSON; its logging
    and connection close are kept. A client's half-close is answered (module docstring)."""

    eof_aborts: EofAborts | None = None
    head_timeout_s: float | None = None
    _peer_done = False  # the client has sent all it will: close once it is answered
    _eof_error: HttpProcessingError | None = None  # the parser's, at the end of the stream
    _head_timer: asyncio.TimerHandle | None = None
    _bytes_seen = False  # since the timer was armed
    _latest_body: Any = None  # the payload of the latest request the parser read
    _armed_at = 0  # requests whose head had arrived when the timer was armed

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        make_request = getattr(self, "_request_factory", None)  # aiohttp's, not public
        if make_request is not None:

            def request_factory(message: Any, *rest: Any) -> web.BaseRequest:
                return make_request(_UNPARSED if message is ERROR else message, *rest)

            self._request_factory = request_factory

    # -- each request's head must arrive within head_timeout_s ------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm_head_timer()

    def _arm_head_timer(self) -> None:
        """Start waiting for the next request's head (at the connection's start, and after
        each answer: aiohttp's keep-alive timeout does not close a connection holding part
        of a head, so one cheap request, then half a request line, held it for good)."""
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if self.head_timeout_s and self.transport is not None:
            self._armed_at, self._bytes_seen = self._request_count, False
            loop = asyncio.get_running_loop()
            self._head_timer = loop.call_later(self.head_timeout_s, self._head_timed_out)

    def data_received(self, data: bytes) -> None:
        self._bytes_seen = self._bytes_seen or bool(data)
        queued = len(self._messages)
        super().data_received(data)
        if len(self._messages) > queued:
            for message, payload in list(self._messages)[queued:]:
                if not isinstance(message, _ErrInfo):
                    self._latest_body = payload
            self._fail_the_body_being_read()

    def _fail_the_body_being_read(self) -> None:
        """The parser's error arrived as a request of its own while the body of a request
        already handed out was still arriving: it is that body's error. aiohttp fails a
        deflate body that does not end its stream only at the body's end, by raising from
        the parser (probe 46): a body that came after its head, in a later read, was never
        told, and its route waited for it until TOLLGATE_BODY_READ_TIMEOUT_S (a 408), the
        error then answered as one more request. Now reading the body raises the error, as
        for a gzip body that does not decode, and nothing else is answered."""
        message, _ = self._messages[-1]
        if not isinstance(message, _ErrInfo) or not isinstance(message.exc, HttpProcessingError):
            return
        # The body of the latest request read: aiohttp's handler takes a request off the
        # queue and sets it current only in a task's first step, a loop iteration later (on
        # Python 3.11), so a body arriving in between is in neither place (the CI saw a 408).
        current = self._current_request
        bodies = [current.content] if current is not None else []
        bodies += [payload for _, payload in list(self._messages)[:-1]]
        if self._latest_body is not None and self._latest_body not in bodies:
            bodies.append(self._latest_body)
        unread = [body for body in bodies if not body.is_eof() and body.exception() is None]
        if not unread:
            return  # the error is in a request of its own
        self._messages.pop()
        self._request_count -= 1
        exc = message.exc
        set_exception(unread[-1], RequestPayloadError(str(exc.message)), exc)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)

    def _head_timed_out(self) -> None:
        """No whole request head since the timer was armed: a 408 if part of one came (half
        a request line, a header trickled a byte at a time); at the connection's start with
        nothing sent, only the close (an idle keep-alive connection is aiohttp's to close)."""
        self._head_timer = None
        transport = self.transport
        if transport is None or transport.is_closing() or self._request_count > self._armed_at:
            return
        if self._request_in_progress or self._messages:
            self._arm_head_timer()  # an answer still being made: wait after it
            return
        if not self._bytes_seen and self._armed_at:
            return
        if self._bytes_seen:
            error = ApiError(
                408,
                "request_timeout",
                f"The request line and headers did not arrive within {self.head_timeout_s:g}s "
                "(TOLLGATE_BODY_READ_TIMEOUT_S): send the whole head at once",
            )
            body = orjson.dumps(error.body())
            transport.write(
                b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\nX-Request-Id: %s\r\nDate: %s\r\n"
                b"Connection: close\r\n\r\n%s"
                % (len(body), new_id("req_").encode(), formatdate(usegmt=True).encode(), body)
            )
        self.force_close()
        transport.close()

    def eof_received(self) -> bool | None:  # type: ignore[override]  # asyncio allows a bool
        waiting = self._waiter is not None and not self._waiter.done()
        if waiting and not self._messages:
            return None  # between requests, or inside a request line: close, as aiohttp does
        current = self._current_request
        if (
            current is not None
            and current.content.is_eof()  # its body is whole: the call may be running
            and self.eof_aborts is not None
            and self.eof_aborts(current)
        ):
            return None  # the client gave up on a paid call: aiohttp closes the connection
        self._peer_done = True
        if self._parser is not None:
            try:
                self._parser.feed_eof()
            except HttpProcessingError as exc:  # the last request's body cannot be read whole
                self._eof_error = exc
                for message, payload in self._messages:
                    self._fail_unread_body(payload, getattr(message, "headers", None) or {})
                if current is not None:
                    self._fail_unread_body(current.content, current.headers)
        return True  # keep the sending side open for the answers

    def _fail_unread_body(self, payload: Any, headers: Any) -> None:
        """Make reading ``payload`` (a body the stream ended inside) raise what the end of
        the stream means for it, unless the parser has failed it already: its error says why
        (a body that does not decode, whose length the parser then stopped counting, is not
        one cut short)."""
        if self._eof_error is None or payload.is_eof() or payload.exception() is not None:
            return
        payload.set_exception(_unreadable(self._eof_error, headers.get("Content-Encoding", "")))

    async def _handle_request(self, request: web.BaseRequest, *args: Any) -> Any:
        # A request taken from the queue just before the end of the stream was seen
        self._fail_unread_body(request.content, request.headers)
        return await super()._handle_request(request, *args)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        super().handle_error(request, status, exc, message)  # logs; refuses once sent
        too_large = (
            _too_large(exc, self.max_field_size, self.max_headers) if status == 400 else None
        )
        if too_large is not None:
            error = too_large
        elif isinstance(exc, RequestPayloadError):
            # A body the parser could not read (one that does not decode as its
            # Content-Encoding says), raised by ``request.read()`` in a route that let it
            # through: the client's error, a 400, as when the end of the stream was seen first
            cause = exc.__cause__
            if isinstance(cause, HttpProcessingError):
                detail = _unreadable(cause, request.headers.get("Content-Encoding", "")).detail
            else:
                detail = f"The request body could not be read: {str(exc)[:200]}"
            error = ApiError(400, "invalid_request_error", detail)
        elif isinstance(exc, ContentEncodingError):  # from the parser; the request is lost
            error = ApiError(400, "invalid_request_error", undecodable(exc, _encoding_of(exc)))
        elif status < 500:
            detail = str(exc.message if isinstance(exc, HttpProcessingError) else message)
            detail = " ".join(detail.split())[:300]
            error = ApiError(
                status,
                "invalid_request_error",
                f"The request is not valid HTTP/1.1 and was not read: {detail}. Send a "
                "request line, headers of 'Name: value' and a body framed by a numeric "
                "Content-Length or by chunked encoding, not both.",
            )
        elif status == 504:
            error = ApiError(504, "timeout", "The request took too long to handle.")
        else:
            error = ApiError(status, "internal_error", "The request could not be handled.")
        response = _json_error(error)
        response.force_close()
        return response

    async def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        # An HTTP error raised before any middleware (aiohttp's 417 for an `Expect` other
        # than 100-continue, on every route and on none) was sent as it is: plain text.
        if isinstance(resp, web.HTTPException) and resp.status >= 400:
            param = None
            message = resp.text or resp.reason
            if resp.status == 417:
                expect = request.headers.get("Expect", "")[:100]
                message = (
                    f"Expect: {expect!r} cannot be met; only 'Expect: 100-continue' is "
                    "understood. Send the request without it."
                )
                param = "Expect"
            error_type = "invalid_request_error"
            if resp.status == 413:  # a body announced past the limit (``Expect``)
                error_type = "request_too_large"
            plain = resp.text == f"{resp.status}: {resp.reason}"  # aiohttp's, from its router
            allow = resp.headers.get("Allow")
            if plain and isinstance(resp, web.HTTPNotFound):
                error_type = "not_found"
                message = f"No route {request.method} {request.path[:200]}{_served(request)}"
            elif plain and isinstance(resp, web.HTTPMethodNotAllowed):
                allowed = ", ".join(sorted(resp.allowed_methods))
                message = f"{request.method} is not allowed on {request.path[:200]}; use {allowed}"
            resp = _json_error(ApiError(resp.status, error_type, message, param=param))
            if allow is not None:  # RFC 9110: a 405 lists what is allowed
                resp.headers["Allow"] = allow
        if request.content.exception() is not None and not resp.prepared:
            # The body could not be read (it does not decode as its Content-Encoding says):
            # the parser cannot tell where the next request starts, so the connection is
            # closed after this answer, which now says so (probe 46: a client's next request
            # on it was reset)
            resp.force_close()
        finished = await super().finish_response(request, resp, start_time)
        if self._peer_done and not self._messages:
            self.close()  # the client sent all it will and has every answer
        else:
            self._arm_head_timer()
        return finished


def _served(request: web.BaseRequest) -> str:
    """The routes of the request's application, as a 404's message ends them ("; this
    server serves GET /healthz, GET /metrics"), or "" where there is no application."""
    try:
        app = request.app if isinstance(request, web.Request) else None
    except (AttributeError, RuntimeError):
        app = None
    if app is None:
        return ""
    routes = sorted(
        {
            f"{route.method} {route.resource.canonical}"
            for route in app.router.routes()
            if route.resource is not None and route.method not in ("HEAD", "*")
        }
    )
    shown = ", ".join(routes[:12]) + (", ..." if len(routes) > 12 else "")
    return f"; this server serves {shown}" if shown else ""


class _JsonErrorsServer(web.Server):
    eof_aborts: EofAborts | None = None
    head_timeout_s: float | None = None

    def __call__(self) -> RequestHandler:
        handler = _JsonErrorsHandler(self, loop=self._loop, **self._kwargs)
        handler.eof_aborts = self.eof_aborts
        handler.head_timeout_s = self.head_timeout_s
        return handler


class JsonErrorsRunner(web.AppRunner):
    """An :class:`aiohttp.web.AppRunner` whose connections answer the parser's errors in
    JSON, with request lines and headers up to :data:`MAX_LINE_BYTES`, and that answer a
    client's half-close except where ``eof_aborts`` says the client gave up."""

    def __init__(
        self,
        app: web.Application,
        *,
        eof_aborts: EofAborts | None = None,
        head_timeout_s: float | None = HEAD_TIMEOUT_S,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("max_line_size", MAX_LINE_BYTES)
        kwargs.setdefault("max_field_size", MAX_LINE_BYTES)
        super().__init__(app, **kwargs)
        self._eof_aborts = eof_aborts
        self._head_timeout_s = head_timeout_s

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _JsonErrorsServer  # aiohttp builds it; only __call__ differs
        assert isinstance(server, _JsonErrorsServer)
        server.eof_aborts = self._eof_aborts
        server.head_timeout_s = self._head_timeout_s
        return server


async def serve_app(
    app: web.Application,
    host: str,
    port: int,
    *,
    shutdown_timeout: float = 60.0,
    backlog: int = 128,
    reuse_address: bool | None = None,
    eof_aborts: EofAborts | None = None,
    head_timeout_s: float | None = HEAD_TIMEOUT_S,
) -> web.AppRunner:
    """Set ``app`` up with :class:`JsonErrorsRunner` (no access log) and listen on
    ``host:port``; returns the runner to clean up."""
    quiet_unparsable_requests()
    runner = JsonErrorsRunner(
        app,
        access_log=None,
        shutdown_timeout=shutdown_timeout,
        eof_aborts=eof_aborts,
        head_timeout_s=head_timeout_s,
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=backlog, reuse_address=reuse_address)
    await site.start()
    return runner
