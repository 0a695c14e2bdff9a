"""A small, bounded HTTP/1.x server for one WSGI app (the /metrics endpoint), on one thread.

Theory of operation:
- One serving thread runs a ``selectors`` loop over the listening socket, a wake-up socket pair and every
  open connection. There is no thread per connection: a connection costs a few hundred bytes of state and a
  file descriptor, and at most ``max_connections`` are open at once.
- A connection carries one request (``Connection: close``, as prometheus_client's own server does; a
  Prometheus server simply connects again for its next scrape). Its life: read the request head (at most
  ``MAX_HEAD`` bytes), call the app, send the answer, close.
- Bounds: the whole request head must arrive within ``read_timeout`` of the accept, however slowly it
  trickles in (a slowloris client is closed then); a connection that moves no byte either way for
  ``idle_timeout`` is closed (in practice a client that stops reading its answer). When a new connection
  would exceed ``max_connections``, the oldest one still waiting for its request is closed to make room:
  a flood of idle connections cannot lock out a scraper, whose request follows its connect at once.
- The app runs on the serving thread, synchronously: for the metrics it reads the engine's plain ints at
  scrape time and never waits on the data path's event loop. Answers are built whole (a scrape is tens of
  KiB) and written as the socket takes them.
- Nothing here imports prometheus_client: the app is any WSGI callable (``make_wsgi_app``), which keeps its
  content negotiation (text or OpenMetrics), gzip and ``name[]`` filtering.
"""

from __future__ import annotations

import io
import selectors
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import unquote

MAX_CONNECTIONS = 64  # open at once; a handful of Prometheus servers and people with curl need far fewer
READ_TIMEOUT = 5.0  # seconds from accept to a complete request head
IDLE_TIMEOUT = 10.0  # seconds without a byte moving either way
MAX_HEAD = 8192  # bytes of request line and headers; a scrape's are a few hundred
BACKLOG = 128  # the listen queue, so that a burst of connects waits to be accepted rather than being dropped
ACCEPTS_PER_WAKEUP = 64  # bounded, so that open connections are served while a flood keeps arriving

REASONS = {200: "OK", 400: "Bad Request", 405: "Method Not Allowed", 431: "Request Header Fields Too Large",
           500: "Internal Server Error", 505: "HTTP Version Not Supported"}


@dataclass(eq=False)
class _Connection:
    sock: socket.socket
    peer: tuple
    deadline: float  # the request head must be complete by then
    last_io: float
    received: bytearray = field(default_factory=bytearray)
    answer: memoryview | None = None  # set once the request is handled; what is left to send


class HttpServer:
    """Serves ``app`` at ``(host, port)``; binds and listens on construction, serves from ``start()``.

    Raises ``OSError`` (``socket.gaierror`` for a name that does not resolve) when it cannot listen.
    """

    def __init__(self, host: str, port: int, app: Callable, *, max_connections: int = MAX_CONNECTIONS,
                 read_timeout: float = READ_TIMEOUT, idle_timeout: float = IDLE_TIMEOUT,
                 clock: Callable[[], float] = time.monotonic) -> None:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        self.app = app
        self.max_connections = max_connections
        self.read_timeout = read_timeout
        self.idle_timeout = idle_timeout
        self._clock = clock
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            # As http.server does: a restarted daemon may bind while old connections sit in TIME_WAIT.
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((host, port))
            listener.listen(BACKLOG)
            listener.setblocking(False)
        except BaseException:
            listener.close()
            raise
        self._listener = listener
        self.server_address = listener.getsockname()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._conns: dict[socket.socket, _Connection] = {}  # insertion order = accept order: oldest first
        self._server_name = host or "localhost"  # for the environ only: no name lookup

    # -- lifetime -------------------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="metrics-http", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop serving (waits for the serving thread) and close every socket."""
        self._stopping = True
        if self._thread is not None:
            try:
                self._wake_w.send(b"x")
            except OSError:
                pass
            self._thread.join(timeout=5)
            self._thread = None
        for conn in list(self._conns.values()):
            conn.sock.close()
        self._conns.clear()
        self.close_listener()

    def close_listener(self) -> None:
        """Close the listening socket and the wake-up pair (a forked worker's copy: nothing serves yet)."""
        for s in (self._listener, self._wake_r, self._wake_w):
            s.close()

    @property
    def connections(self) -> int:
        """Connections open now (for tests and debugging)."""
        return len(self._conns)

    # -- the serving thread ---------------------------------------------------------------------------------

    def _serve(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        sel.register(self._listener, selectors.EVENT_READ, "listen")
        try:
            while not self._stopping:
                for key, events in sel.select(self._next_timeout()):
                    if key.data == "wake":
                        return
                    if key.data == "listen":
                        self._accept(sel)
                    elif self._conns.get(key.data.sock) is key.data:  # not closed earlier in this round
                        if events & selectors.EVENT_READ:
                            self._read(sel, key.data)
                        elif events & selectors.EVENT_WRITE:
                            self._write(sel, key.data)
                self._expire(sel)
        finally:
            sel.close()

    def _next_timeout(self) -> float | None:
        if not self._conns:
            return None
        now = self._clock()
        soonest = min(min(c.deadline if c.answer is None else float("inf"), c.last_io + self.idle_timeout)
                      for c in self._conns.values())
        return max(0.0, soonest - now)

    def _accept(self, sel: selectors.BaseSelector) -> None:
        for _ in range(ACCEPTS_PER_WAKEUP):
            try:
                sock, peer = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # ECONNABORTED, EMFILE, ...: the next wake-up tries again
                return
            if len(self._conns) >= self.max_connections and not self._evict(sel):
                sock.close()  # every open connection is busy answering: refuse this one
                continue
            sock.setblocking(False)
            now = self._clock()
            conn = _Connection(sock, peer, deadline=now + self.read_timeout, last_io=now)
            self._conns[sock] = conn
            sel.register(sock, selectors.EVENT_READ, conn)

    def _evict(self, sel: selectors.BaseSelector) -> bool:
        """Close the oldest connection still waiting for its request; False if there is none."""
        for conn in self._conns.values():
            if conn.answer is None:
                self._drop(sel, conn)
                return True
        return False

    def _drop(self, sel: selectors.BaseSelector, conn: _Connection) -> None:
        sel.unregister(conn.sock)
        del self._conns[conn.sock]
        conn.sock.close()

    def _expire(self, sel: selectors.BaseSelector) -> None:
        now = self._clock()
        for conn in [c for c in self._conns.values()
                     if (c.answer is None and now >= c.deadline) or now >= c.last_io + self.idle_timeout]:
            self._drop(sel, conn)

    def _read(self, sel: selectors.BaseSelector, conn: _Connection) -> None:
        try:
            data = conn.sock.recv(MAX_HEAD + 1 - len(conn.received))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the client went away before finishing its request
            self._drop(sel, conn)
            return
        conn.last_io = self._clock()
        conn.received += data
        end = conn.received.find(b"\r\n\r\n")
        if end < 0:
            end = conn.received.find(b"\n\n")
        if end < 0:
            if len(conn.received) > MAX_HEAD:
                self._answer(sel, conn, 431, b"request head too large\n")
            return
        self._answer(sel, conn, *self._call_app(bytes(conn.received[:end])))

    def _answer(self, sel: selectors.BaseSelector, conn: _Connection, status: int | str, body: bytes,
                headers: list[tuple[str, str]] | None = None) -> None:
        if isinstance(status, int):
            status = f"{status} {REASONS.get(status, '')}"
        lines = [f"HTTP/1.1 {status}", *(f"{k}: {v}" for k, v in headers or [("Content-Type", "text/plain")]),
                 f"Content-Length: {len(body)}", "Connection: close", "", ""]
        conn.answer = memoryview("\r\n".join(lines).encode("latin-1") + body)
        conn.received = bytearray()
        sel.modify(conn.sock, selectors.EVENT_WRITE, conn)
        self._write(sel, conn)

    def _write(self, sel: selectors.BaseSelector, conn: _Connection) -> None:
        assert conn.answer is not None
        try:
            sent = conn.sock.send(conn.answer)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(sel, conn)
            return
        conn.last_io = self._clock()
        conn.answer = conn.answer[sent:]
        if not conn.answer:
            try:
                conn.sock.shutdown(socket.SHUT_WR)  # the client sees the end before the close
            except OSError:
                pass
            self._drop(sel, conn)

    def _call_app(self, head: bytes) -> tuple:
        """(status, body, headers) for one request head; a malformed one gets 400 and a one-line reason."""
        try:
            lines = head.decode("latin-1").replace("\r\n", "\n").split("\n")
            method, target, version = lines[0].split(" ")
        except ValueError:
            return 400, b"malformed request line\n"
        if not version.startswith("HTTP/1."):
            return 505, b"only HTTP/1.x\n"
        path, _, query = target.partition("?")
        environ = {
            "REQUEST_METHOD": method, "PATH_INFO": unquote(path), "QUERY_STRING": query,
            "SERVER_PROTOCOL": version, "SERVER_NAME": self._server_name, "SERVER_PORT": str(self.server_address[1]),
            "SCRIPT_NAME": "", "wsgi.version": (1, 0), "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(),
            "wsgi.errors": sys.stderr, "wsgi.multithread": False, "wsgi.multiprocess": False,
            "wsgi.run_once": False,
        }
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                return 400, b"malformed header line\n"
            key = name.upper().replace("-", "_")
            key = key if key in ("CONTENT_TYPE", "CONTENT_LENGTH") else f"HTTP_{key}"
            environ[key] = value.strip()
        reply: list = []
        try:
            chunks = self.app(environ, lambda status, headers, exc_info=None: reply.extend((status, headers)))
            body = b"".join(chunks)
        except Exception as e:  # a collector's bug must not take the endpoint down
            return 500, f"scrape failed: {type(e).__name__}: {e}\n".encode()
        status, headers = reply
        return status, body, list(headers)
