"""Running the serving app on uvicorn so that slow or idle clients cannot lock others out.

uvicorn times out idle keep-alive sockets but waits forever for a request's headers, so a few dozen
sockets that send nothing, or a header byte every few seconds, would hold every connection slot.
:class:`GuardedH11Protocol` gives each request a deadline for its headers; the app itself gives
each upload a deadline for its body (see :func:`efficientad.serve.read_body`). Together they bound
how long any client can hold the server's resources without finishing a request.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .config import SERVE_HEADER_TIMEOUT, SERVE_KEEP_ALIVE_TIMEOUT, SERVE_MAX_CONNECTIONS
from .errors import EfficientADError


class GuardedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, plus a deadline for each request's headers.

    The clock starts when the connection opens, or for a later request on a kept-alive connection
    at its first byte (until then uvicorn's keep-alive timeout applies). A client that has sent
    part of a request by the deadline gets 408; one that has sent nothing is closed quietly, as
    browsers open spare connections they may never use.
    """

    def __init__(self, *args: Any, header_timeout: float, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self._header_deadline: asyncio.TimerHandle | None = None
        self._partial_request = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_header_clock()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            # Still waiting for (the rest of) a request's headers.
            self._partial_request = self._partial_request or bool(data)
            if self._header_deadline is None:
                self._start_header_clock()
        else:
            self._stop_header_clock()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_clock()
        super().connection_lost(exc)

    def _start_header_clock(self) -> None:
        self._header_deadline = self.loop.call_later(self.header_timeout, self._headers_overdue)

    def _stop_header_clock(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None
        self._partial_request = False

    def _headers_overdue(self) -> None:
        self._header_deadline = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self._partial_request:
            # h11 cannot answer a request it has not parsed yet: the answer is written by hand.
            message = f"request headers not received within {self.header_timeout:g} s".encode()
            self.transport.write(
                b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
                b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(message), message)
            )
        self.transport.close()


def server_config(
    app: Any,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    header_timeout: float = SERVE_HEADER_TIMEOUT,
    keep_alive_timeout: float = SERVE_KEEP_ALIVE_TIMEOUT,
    max_connections: int = SERVE_MAX_CONNECTIONS,
) -> Any:
    """A ``uvicorn.Config`` for ``app`` with the header deadline and a cap on open connections.

    Connections beyond ``max_connections`` get uvicorn's 503; requests in progress are bounded by
    the app itself (``max_pending`` of :func:`efficientad.serve.create_app`).
    """
    import uvicorn

    for name, value in (("header_timeout", header_timeout), ("keep_alive_timeout", keep_alive_timeout), ("max_connections", max_connections)):
        if not value > 0:
            raise EfficientADError(f"{name} must be > 0, got {value}")
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        http=functools.partial(GuardedH11Protocol, header_timeout=header_timeout),
        timeout_keep_alive=keep_alive_timeout,
        limit_concurrency=max_connections,
    )
