"""Limits every TCP server of ours built on aiohttp keeps (the origin's API, the PoP's push
listener) against slow, idle and flooding clients.

- A connection must complete its request headers within HEADER_TIMEOUT of connecting or of
  its previous answer (aiohttp's keep-alive timer runs from the connection's start and is
  not reset by partial data), and its body within BODY_TIMEOUT.
- At most `cap` connections are open; at the cap the oldest connection with no request in
  progress is closed to admit the new one, and when every one is busy the new one is closed.
  The cap stays below the process's descriptor limit, so accept() never runs out of them.
- Errors of the event loop and of aiohttp's request handling are logged one line each,
  at most once per LOG_EVERY seconds per kind, with a count of the ones left out: a flood
  must not turn into megabytes of tracebacks.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

log = logging.getLogger("adpop.http")

HEADER_TIMEOUT = 10.0
BODY_TIMEOUT = 30.0
LOG_EVERY = 10.0
# asyncio accepts up to BACKLOG connections in one go, before the cap sees any of them:
# the cap leaves that many descriptors free, and FD_HEADROOM more for files, the database
# and outgoing connections.
BACKLOG = 128
FD_HEADROOM = 64


def connection_cap(wanted: int) -> int:
    """`wanted`, lowered to fit the process's descriptor limit with headroom."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(8, min(wanted, soft - FD_HEADROOM - BACKLOG))


class _Refused(asyncio.Protocol):
    """What a connection over the cap gets: closed at once."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


class Guard:
    """The cap, the body timeout and the busy marks of one server; see the module text."""

    @property
    def cap(self) -> int:
        # Read per connection: the descriptor limit can change under a running process
        # (prlimit), and the cap must follow it down.
        return connection_cap(self.wanted)

    def __init__(self, cap: int) -> None:
        self.wanted = cap
        self.busy: set[asyncio.BaseTransport] = set()
        self.evicted = 0
        self.refused = 0
        # Paths whose handlers read (and time) their bodies themselves, after checking who
        # asks: what is not read for them here is not bounded by client_max_size either.
        self.streamed: tuple[str, ...] = ()

    def app(self, **kwargs: Any) -> web.Application:
        return web.Application(middlewares=[self._middleware], **kwargs)

    @web.middleware
    async def _middleware(self, request: web.Request,
                          handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                          ) -> web.StreamResponse:
        transport = request.transport
        if transport is not None:
            self.busy.add(transport)
        try:
            if request.can_read_body and not request.path.startswith(self.streamed):
                try:
                    async with asyncio.timeout(BODY_TIMEOUT):
                        await request.read()  # kept by aiohttp for the handler
                except TimeoutError:
                    raise web.HTTPRequestTimeout(
                        text=f"request body not complete within {BODY_TIMEOUT:.0f} s") from None
            return await handler(request)
        finally:
            if transport is not None:
                self.busy.discard(transport)

    def factory(self, server: web.Server) -> Callable[[], asyncio.Protocol]:
        def make() -> asyncio.Protocol:
            connections = server.connections
            if len(connections) >= self.cap:
                idle = [c for c in connections
                        if c.transport is not None and c.transport not in self.busy]
                if not idle:
                    self.refused += 1
                    return _Refused()
                idle[0].force_close()  # the oldest: the list is in the order they came
                self.evicted += 1
            return server()
        return make


async def start(runner: web.AppRunner, guard: Guard, host: str, port: int,
                tls: ssl.SSLContext | None = None) -> asyncio.Server:
    """Listens on host:port with the guard's cap (and TLS when given: a handshake must end
    within HEADER_TIMEOUT too); `runner` must be set up with `runner_kwargs()`."""
    assert runner.server is not None
    loop = asyncio.get_running_loop()
    return await loop.create_server(guard.factory(runner.server), host, port,
                                    reuse_address=True, backlog=BACKLOG, ssl=tls,
                                    ssl_handshake_timeout=HEADER_TIMEOUT if tls else None)


def runner_kwargs() -> dict[str, Any]:
    # The keep-alive timer is also the header timeout: it runs from the connection's start.
    return {"keepalive_timeout": HEADER_TIMEOUT}


class RateLimited(logging.Filter):
    """Passes one record per logger and message per LOG_EVERY seconds, without its
    traceback (the exception's one line is kept), and says how many it left out."""

    def __init__(self) -> None:
        super().__init__()
        self.last: dict[tuple[str, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg))
        now = time.monotonic()
        seen, dropped = self.last.get(key, (0.0, 0))
        if now - seen < LOG_EVERY:
            self.last[key] = (seen, dropped + 1)
            return False
        self.last[key] = (now, 0)
        if record.exc_info and record.exc_info[1] is not None:
            record.msg = f"{record.msg}: " + repr(record.exc_info[1]).replace("%", "%%")
            record.exc_info = None
        if dropped:
            record.msg = f"{record.msg} ({dropped} more like it left out)"
        return True


def quiet_floods(loop: asyncio.AbstractEventLoop) -> None:
    """Rate-limits what a flood makes the loop and aiohttp log (see RateLimited)."""
    limiter = RateLimited()
    for name in ("asyncio", "aiohttp.server", "aiohttp.web"):
        logging.getLogger(name).addFilter(limiter)

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        # The message is the record's format, so the limiter tells kinds apart by it.
        message = str(context.get("message", "event loop error")).replace("%", "%%")
        exc = context.get("exception")
        if exc is not None:
            logging.getLogger("asyncio").error(message + ": %r", exc)
        else:
            logging.getLogger("asyncio").error(message)

    loop.set_exception_handler(handler)
