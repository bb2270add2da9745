"""Connection limits: a cap on open connections, and quiet logs when accept() fails.

A daemon that accepts every connection runs out of file descriptors under a flood of idle
connections, and then every listener stops answering. So:

- :class:`CappedSite` serves a listening socket like aiohttp's ``SockSite``, but a
  connection beyond ``max_connections`` (over all listeners) gets an immediate
  ``HTTP 503`` and is closed, instead of holding a descriptor;
- :func:`open_files_limit` raises the soft ``RLIMIT_NOFILE`` to the hard limit (as Go
  programs do) and :func:`connection_cap` keeps the cap below it;
- :class:`AcceptErrorLog` replaces the event loop's traceback per failed ``accept()``
  (EMFILE and friends, retried every second by asyncio) with one line per interval and a
  count, and :class:`HttpServerLog` aiohttp's traceback per request that is not valid HTTP
  with one INFO line.

Idle connections are closed by aiohttp's keep-alive timer, which the server sets to
KRASIS_HEADER_TIMEOUT: it fires when a connection has no complete request's headers.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import resource
import socket
import time
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

log = logging.getLogger(__name__)

# How long a refused connection may stay open to take its request before it is closed
# (closing a socket with an unread request resets a TCP connection, and the client would
# miss the 503), and how many refused connections may wait so at once.
REFUSE_LINGER_S = 1.0
MAX_LINGERING_REFUSALS = 64
# Descriptors kept below the open-files limit: the daemon's own (listeners, runner pipes, the
# registry, logs) and the refused connections that are closing.
RESERVED_FDS = 64 + MAX_LINGERING_REFUSALS
_RESOURCE_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


def open_files_limit() -> int:
    """Raise the soft open-files limit to the hard one; return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        wanted = 1 << 20 if hard == resource.RLIM_INFINITY else hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open files limit",
                        extra={"soft": soft, "hard": hard, "error": str(exc)})
    return soft


def connection_cap(max_connections: int, open_files: int) -> int:
    """KRASIS_MAX_CONNECTIONS, lowered to leave RESERVED_FDS descriptors when the limit is low."""
    room = max(1, open_files - RESERVED_FDS)
    if max_connections > room:
        log.warning("KRASIS_MAX_CONNECTIONS lowered to fit the open files limit", extra={
            "max_connections": max_connections, "open_files_limit": open_files, "using": room})
        return room
    return max_connections


def refusal_response(max_connections: int) -> bytes:
    """The whole HTTP 503 a connection beyond the cap gets."""
    body = json.dumps({"error": f"too many connections (KRASIS_MAX_CONNECTIONS="
                                f"{max_connections}); try again later"}).encode()
    head = ("HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n")
    return head.encode() + body


class _Refusal(asyncio.Protocol):
    """Writes the 503 at once, then closes when the request has arrived (or soon after)."""

    def __init__(self, response: bytes, lingering: set[_Refusal], linger_s: float):
        self._response = response
        self._lingering = lingering
        self._linger_s = linger_s
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        transport.write(self._response)  # type: ignore[attr-defined]
        if len(self._lingering) >= MAX_LINGERING_REFUSALS:
            transport.close()
            return
        self._lingering.add(self)
        self._timer = asyncio.get_running_loop().call_later(self._linger_s, transport.close)

    def data_received(self, data: bytes) -> None:
        if b"\r\n\r\n" in data and self._transport is not None:
            self._transport.close()  # the request's headers are read: no reset on close

    def eof_received(self) -> bool:
        return False  # close

    def connection_lost(self, exc: BaseException | None) -> None:
        self._lingering.discard(self)
        if self._timer is not None:
            self._timer.cancel()


class ConnectionCap:
    """Counts the server's open connections; hands out the real protocol or a refusal."""

    def __init__(self, max_connections: int, linger_s: float = REFUSE_LINGER_S):
        self.max_connections = max_connections
        self.refused = 0
        self._linger_s = linger_s
        self._response = refusal_response(max_connections)
        self._lingering: set[_Refusal] = set()
        self._last_log_s = float("-inf")

    def protocol_factory(self, server: web.Server):
        """A factory for ``loop.create_server``: aiohttp's handler while under the cap."""

        def make() -> asyncio.BaseProtocol:
            if len(server.connections) < self.max_connections:
                return server()
            self.refused += 1
            now_s = time.monotonic()
            if now_s - self._last_log_s >= 10.0:
                self._last_log_s = now_s
                log.warning("too many connections; refusing new ones with 503", extra={
                    "max_connections": self.max_connections, "refused": self.refused})
            return _Refusal(self._response, self._lingering, self._linger_s)

        return make


class CappedSite(web.BaseSite):
    """aiohttp's SockSite with a :class:`ConnectionCap` shared by all listeners."""

    def __init__(self, runner: web.BaseRunner, sock: socket.socket, cap: ConnectionCap,
                 backlog: int = 512):
        super().__init__(runner, backlog=backlog)
        self._sock = sock
        self._cap = cap

    @property
    def name(self) -> str:
        address = self._sock.getsockname()
        return f"http://unix:{address}:" if isinstance(address, str) \
            else f"http://{address[0]}:{address[1]}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None, "the runner is set up before its sites start"
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._cap.protocol_factory(server),
                                                sock=self._sock, backlog=self._backlog)


class AcceptErrorLog:
    """An event loop exception handler: failed accept() calls become one line per interval.

    asyncio reports each ``accept()`` that fails for lack of descriptors or memory (and
    retries a second later) with a traceback; under a connection flood that is megabytes
    a minute. Here the first failure of an interval logs one line, the others are counted
    and the count is logged when the interval ends. Every other report goes to the
    default handler.
    """

    def __init__(self, interval_s: float = 10.0):
        self.interval_s = interval_s
        self._count = 0
        self._flush: asyncio.TimerHandle | None = None

    @staticmethod
    def is_accept_error(context: dict[str, Any]) -> bool:
        exc = context.get("exception")
        return "accept" in str(context.get("message", "")) and isinstance(exc, OSError) \
            and exc.errno in _RESOURCE_ERRNOS

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if not self.is_accept_error(context):
            loop.default_exception_handler(context)
            return
        if self._flush is not None:
            self._count += 1
            return
        exc = context["exception"]
        log.error("accept() failed; new connections wait", extra={
            "error": errno.errorcode.get(exc.errno, str(exc.errno)), "reason": exc.strerror})
        self._flush = loop.call_later(self.interval_s, self._report)

    def _report(self) -> None:
        self._flush = None
        if self._count:
            log.error("accept() kept failing", extra={"failures": self._count,
                                                      "interval_s": self.interval_s})
            self._count = 0


class HttpServerLog:
    """aiohttp's server logger (``AppRunner(logger=...)``): a request that is not valid HTTP
    (garbage bytes, an over-long header line) is one INFO line, where aiohttp logs an ERROR
    with a traceback for each; everything else is logged as aiohttp does."""

    def __init__(self, logger: logging.Logger | None = None):
        self._log = logger or logging.getLogger("aiohttp.server")

    def exception(self, msg: str, *args, exc_info=None, **kwargs) -> None:
        if isinstance(exc_info, HttpProcessingError):
            text = (exc_info.message or type(exc_info).__name__).strip().splitlines()
            self._log.info("bad HTTP request", extra={
                "status": exc_info.code, "error": text[0] if text else type(exc_info).__name__})
            return
        self._log.exception(msg, *args, exc_info=exc_info if exc_info is not None else True,
                            **kwargs)

    def debug(self, msg: str, *args, **kwargs) -> None:
        self._log.debug(msg, *args, **kwargs)
