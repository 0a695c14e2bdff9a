"""The control socket: ``tunneld show`` and ``tunneld peer add|remove`` talk to a running daemon here.

Theory of operation:
  - One unix stream socket per tunnel, ``RUNTIME_DIR/DEV.sock`` (RUNTIME_DIR: ``runtime_dir()``), tagged
    ``DEV:netINODE.sock`` outside the host's network namespace (client.py says why and how), made with
    mode 0600 (the umask while binding, so there is no moment it is wider) in a directory made 0755 if
    missing. A socket file already there is replaced only when nothing answers on it (a daemon that died);
    if a daemon answers, this one refuses to start in one line naming it (its pid, from SO_PEERCRED) rather
    than steal its clients.
  - Served on worker 0's event loop, beside the data path: every step that can wait (reading a request,
    writing a reply) is awaited with a timeout, every buffer is bounded (a request line ≤ MAX_LINE, at most
    MAX_CLIENTS connections; one more closes the connection idle longest), so a slow, stuck or hostile client
    costs the data path nothing but a few bytes and a timer, and an operator's command always gets through.
  - Only root and the daemon's own uid are served (SO_PEERCRED, the kernel's word, not the client's); the 0600
    mode already keeps others out when the daemon runs as root, the check also holds when it does not.
  - The protocol, JSON lines (README "Control socket"): one request object per line, one reply object per
    line, in order; a connection may carry several. Requests::

        {"command": "show"}
        {"command": "peer-add", "address": "10.0.0.3", "name": "c", "routes": ["10.9.0.0/24"], "macs": [...]}
        {"command": "peer-remove", "address": "10.0.0.3"}

    Replies: ``{"ok": true, "result": {...}}`` (show: the handler's dict, SHOW_SCHEMA) or ``{"ok": true}``
    (peer-add: with ``"warning": "one line"`` when it was done but something is amiss, e.g. the peer's path MTU);
    ``{"ok": false, "error": "one line"}``, plus ``"denied": true`` when the caller's uid is refused and
    ``"busy": true`` when MAX_CLIENTS connections are all mid-request (the client retries). A request
    that is not JSON, not an object, names an unknown command or key, or carries a bad value gets an error
    reply and changes nothing: it is checked here (``parse_request``) before the handler sees it.
  - The handler (``Handler``) is the tunnel: ``show()``, ``add_peer(PeerSpec)``, ``remove_peer(address)``; it
    raises ConfigError (one line) to refuse. Its calls run on the loop, between two wake-ups of the data path.
  - A ``show`` of a full FDB is 16k entries, ~1.4 MB of JSON: built and encoded at once it would hold the
    loop (and the data path) for hundreds of milliseconds. So its long lists are ``Rows``: a snapshot of the
    items (references, taken at once) turned into JSON ROWS_PER_SLICE at a time, each slice written and
    drained before the next, yielding to the loop in between. The reply is still one JSON object on one line.

The client side (``call``, in client.py, re-exported here) is blocking and used by the command line only.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import socket
from dataclasses import dataclass
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

from tunneld.config.schema import ConfigError
from tunneld.config.checks import check_peer, check_spec
from tunneld.control.client import (  # what both ends share; the client's side is re-exported for its users
    BUSY_RETRIES, EX_FAILURE, EX_NOPERM, EX_TEMPFAIL, EX_UNAVAILABLE, ControlError, call, elsewhere, find_socket,
    listener, netns_tag, render_show)
from tunneld.control import client as _client
from tunneld.io import unix
from tunneld.datapath.peers import PeerSpec

log = logging.getLogger("tunneld")

MAX_LINE = 64 * 1024  # bytes in one request line, newline included
READ_TIMEOUT = 5.0  # seconds a client may take to send a whole request line (or sit idle between requests)
WRITE_TIMEOUT = 5.0  # seconds a reply may wait for a client that does not read
MAX_CLIENTS = 64  # connections served at once; one more closes the one idle longest (or, none idle: "busy")
LISTEN_BACKLOG = 256  # connections the kernel queues before accept(); beyond, connect() fails with EAGAIN
COMMANDS = ("show", "peer-add", "peer-remove")
KEYS = {"show": frozenset(), "peer-add": frozenset({"address", "name", "routes", "macs"}),
        "peer-remove": frozenset({"address"})}

ROWS_PER_SLICE = 256  # entries of a reply's long list encoded between two yields to the loop (~2 ms)
WRITE_PIECE = 16 * 1024  # bytes of a reply gathered before they are written and the loop is yielded to


class Rows(Sequence):
    """A long list in a reply (``show``'s FDB and peers): ``items`` (a snapshot), each made into its JSON object
    by ``render`` only when written (``reply_chunks``), a slice at a time. Reads as the list it stands for."""

    def __init__(self, items: Sequence, render: Callable[[Any], dict]) -> None:
        self.items = items
        self.render = render

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self.render(item) for item in self.items[index]]
        return self.render(self.items[index])

    def __eq__(self, other: object) -> bool:
        return list(self) == other if isinstance(other, (list, Rows)) else NotImplemented


def runtime_dir(cfg: Any) -> str:
    """Where a tunnel's control socket lives."""
    return cfg.runtime_dir


def socket_path(directory: str, dev: str, tag: str | None = None) -> str:
    """The daemon's control socket (client.socket_path: tagged outside the host's network namespace), but the
    plain ``DEV.sock`` in the directory systemd made for this instance alone ($RUNTIME_DIRECTORY: no other
    namespace's daemon puts a socket there), so that the unit's socket is ``/run/tunneld/NAME/DEV.sock`` as
    always, even inside a container whose PID 1 the unit's ProtectProc=invisible hides from the daemon."""
    own = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if tag is None and own and os.path.normpath(directory) == os.path.normpath(own):
        tag = ""
    return _client.socket_path(directory, dev, tag)


class Handler(Protocol):
    """What the control socket drives: the running tunnel (control/handlers.PeerControl). Each call raises
    ConfigError, one line, to refuse (an unknown address, a route another peer owns, ...), and then changes nothing."""

    def show(self) -> dict: ...

    def add_peer(self, spec: PeerSpec) -> str | None: ...  # a warning for the reply (e.g. a small path MTU)

    def remove_peer(self, address: str) -> None: ...


class RequestError(ValueError):
    """A request refused before it reached the handler; ``str()`` is the one-line reply."""


# -- requests --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    command: str
    spec: PeerSpec | None = None  # peer-add
    address: str | None = None  # peer-remove


def _string_list(value: Any, key: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RequestError(f"{key}: expected a list of strings")
    return tuple(value)


def parse_request(line: bytes) -> Request:
    """One request line checked and made canonical; raises RequestError (the one-line reply) otherwise."""
    try:
        obj = json.loads(line)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer too long to convert
        raise RequestError(f"malformed request: not a JSON object ({e})") from None
    except RecursionError:
        raise RequestError("malformed request: nested too deeply") from None
    if not isinstance(obj, dict):
        raise RequestError("malformed request: not a JSON object")
    command = obj.get("command")
    if not isinstance(command, str) or command not in KEYS:  # a list or an object is no command (nor hashable)
        raise RequestError(f"unknown command {command!r}; known: {', '.join(COMMANDS)}")
    unknown = sorted(set(obj) - KEYS[command] - {"command"})
    if unknown:
        raise RequestError(f"{command}: unknown key {unknown[0]!r}")
    if command == "show":
        return Request(command)
    address = obj.get("address")
    if not isinstance(address, str):
        raise RequestError(f"{command}: address: missing; the peer's underlay IPv4/IPv6 address")
    try:
        address = check_peer(address, "address")
    except ConfigError as e:
        raise RequestError(str(e)) from None
    if command == "peer-remove":
        return Request(command, address=address)
    name = obj.get("name")
    if name is not None and not isinstance(name, str):
        raise RequestError("name: expected a string")
    routes = _string_list(obj.get("routes", []), "routes")
    macs = _string_list(obj.get("macs", []), "macs")
    try:  # the peer's own rules, as a configuration file's [[peer]] table gets them
        spec = check_spec(PeerSpec(address, name, routes, macs))
    except ConfigError as e:
        raise RequestError(str(e)) from None
    return Request(command, spec=spec)


def dispatch(handler: Handler, request: Request) -> dict:
    """Run one checked request on the handler; the reply object (a refusal is ``ok: false``)."""
    try:
        if request.command == "show":
            return {"ok": True, "result": handler.show()}
        if request.command == "peer-add":
            warning = handler.add_peer(request.spec)
            return {"ok": True, "warning": warning} if warning else {"ok": True}
        else:
            handler.remove_peer(request.address)
    except ConfigError as e:
        return error(str(e))
    return {"ok": True}


def error(message: str, **extra: Any) -> dict:
    return {"ok": False, "error": " ".join(message.split()), **extra}


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), default=list)  # default: a Rows written whole


def encode(reply: dict) -> bytes:
    return _json(reply).encode() + b"\n"


def reply_chunks(value: Any) -> Iterator[str]:
    """``value`` as JSON text in pieces: everything but ``Rows`` at once, a ``Rows`` ROWS_PER_SLICE items per
    piece (the writer yields to the loop between pieces). Joined, the pieces are ``_json(value)``."""
    if isinstance(value, Rows):
        yield "["
        for at in range(0, len(value), ROWS_PER_SLICE):
            yield ("," if at else "") + _json(value[at : at + ROWS_PER_SLICE])[1:-1]
        yield "]"
    elif isinstance(value, dict) and any(isinstance(v, (Rows, dict)) for v in value.values()):
        yield "{"
        for i, (key, item) in enumerate(value.items()):
            yield ("," if i else "") + _json(key) + ":"
            yield from reply_chunks(item)
        yield "}"
    else:
        yield _json(value)


# -- the server ------------------------------------------------------------------------------------------------


def peer_uid(sock) -> int:
    """The connecting process's uid, as the kernel recorded it at connect() (SO_PEERCRED)."""
    return listener(sock)[1]


def _holder(path: str) -> str | None:
    """Who listens on the unix socket at ``path``, in words for the error line; None when nobody does (a daemon
    that died left the file). Connecting to a unix socket never waits: the kernel says at once whether a
    listener is bound to it, and (SO_PEERCRED) which process made it listen."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
        pid, _ = listener(probe)
    except ConnectionRefusedError:
        return None
    except OSError as e:
        # A full backlog (EAGAIN) is a live daemon too busy to accept; anything else: no listener.
        if e.errno == errno.EAGAIN:
            return "a process too busy to accept connections listens there"
        if e.errno in (errno.EACCES, errno.EPERM):
            return "a process this user may not connect to listens there"
        return None
    finally:
        probe.close()
    other = elsewhere(pid)
    if other is not None:  # only where PID 1's namespace is hidden from us, so that the path carries no tag
        return other
    return f"tunneld pid {pid} serves it in this network namespace" if pid > 0 else "a process listens there"


def _why(e: OSError) -> str:
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{e.strerror}; give --runtime-dir a directory this user may write"
    return e.strerror or str(e)


SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes with the terminating NUL


def bind_socket(path: str) -> socket.socket:
    """The listening socket at ``path``, mode 0600, replacing a stale file; ControlError if a daemon answers
    there (naming it), or the path cannot be made."""
    if len(os.fsencode(path)) > SUN_PATH_MAX:  # the namespace's tag may make a --runtime-dir's room too small
        raise ControlError(f"control socket {path}: {len(os.fsencode(path))} bytes, longer than a unix socket "
                           f"path may be ({SUN_PATH_MAX}); give a shorter --runtime-dir")
    holder: str | None = None

    def live(candidate: str) -> bool:
        nonlocal holder
        holder = _holder(candidate)
        return holder is not None

    try:
        return unix.listen(path, umask=0o177, backlog=LISTEN_BACKLOG, live=live)  # 0600, never looser
    except unix.NotASocket:
        raise ControlError(f"control socket {path}: exists and is not a socket; remove it") from None
    except unix.Taken as e:
        if e.raced:  # another daemon bound it between our look and our bind
            raise ControlError(f"control socket {path} is in use: another tunneld bound it as this one started; "
                               "give this one another --runtime-dir") from None
        raise ControlError(f"control socket {path} is in use: {holder}; stop that daemon first, or give this "
                           "one another --runtime-dir") from None
    except OSError as e:
        raise ControlError(f"control socket {path}: {_why(e)}") from None


class _Connection:
    """One client's connection, as the server keeps it: its task, its stream, and since when (the loop's clock)
    it has been waiting for a request line, or None while a request is handled or its reply written."""

    __slots__ = ("task", "writer", "waiting_since")

    def __init__(self, task: asyncio.Task, writer: asyncio.StreamWriter) -> None:
        self.task = task
        self.writer = writer
        self.waiting_since: float | None = None


class ControlServer:
    """The control socket of one tunnel, served on the running event loop (see the module's docstring).

    At most MAX_CLIENTS connections. One more makes room by closing the connection that has waited longest
    for a request line (an idle client, or one sending a byte at a time): a connection that just arrived has
    its request on the way, an idle one asks nothing. So an operator's ``tunneld show`` gets through however
    many idle or hostile clients hold connections; only when every connection is mid-reply does the newcomer
    get ``busy`` (and its client retries). ``evicted`` counts the connections closed to make room."""

    def __init__(self, path: str, handler: Handler, *, uid: int | None = None) -> None:
        self.path = path
        self.handler = handler
        self.uid = os.geteuid() if uid is None else uid  # besides root, the one uid served
        self.evicted = 0
        self._server: asyncio.AbstractServer | None = None
        self._inode: tuple[int, int] | None = None
        self._connections: dict[asyncio.Task, _Connection] = {}

    @property
    def clients(self) -> int:
        """Connections being served now."""
        return len(self._connections)

    async def start(self) -> None:
        """Bind and serve; raises ControlError (one line) if the socket cannot be had."""
        sock = bind_socket(self.path)
        st = os.stat(self.path)
        self._inode = (st.st_dev, st.st_ino)
        try:
            self._server = await asyncio.start_unix_server(self._serve, sock=sock, limit=MAX_LINE)
        except BaseException:
            sock.close()
            self._unlink()
            raise
        log.debug("control socket at %s", self.path)

    async def stop(self) -> None:
        """Stop listening, drop the connections, remove the socket file (if it is still ours)."""
        if self._server is not None:
            self._server.close()
            self._server = None
        tasks = list(self._connections)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._unlink()

    def _unlink(self) -> None:
        try:
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._inode:  # never remove a file another daemon made since
                os.unlink(self.path)
        except OSError:
            pass

    def _make_room(self) -> bool:
        """Close the connection waiting longest for a request; False when every one is busy with a request."""
        waiting = [c for c in self._connections.values() if c.waiting_since is not None]
        if not waiting:
            return False
        oldest = min(waiting, key=lambda c: c.waiting_since)
        del self._connections[oldest.task]  # no longer counted: the bound holds from now
        oldest.task.cancel()
        oldest.writer.transport.abort()
        self.evicted += 1
        return True

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if len(self._connections) >= MAX_CLIENTS and not self._make_room():
            writer.write(encode(error(f"busy: {MAX_CLIENTS} clients are being answered; try again", busy=True)))
            writer.transport.abort() if writer.transport.get_write_buffer_size() else writer.close()
            return
        conn = self._connections[task] = _Connection(task, writer)
        try:
            uid = peer_uid(writer.get_extra_info("socket"))
            if uid not in (0, self.uid):
                writer.write(encode(error(f"permission denied: uid {uid} is neither root nor the daemon's "
                                          f"uid {self.uid}", denied=True)))
                return
            await self._conversation(reader, writer, conn)
        except (ConnectionError, asyncio.TimeoutError, asyncio.CancelledError):
            pass
        except Exception:  # a bug of ours must cost this one client, never the daemon
            log.exception("control socket: client dropped")
        finally:
            if self._connections.get(task) is conn:
                del self._connections[task]
            writer.transport.abort() if writer.transport.get_write_buffer_size() else writer.close()

    async def _conversation(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                            conn: _Connection) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn.waiting_since = loop.time()  # from here until a line comes, room may be made by closing it
            try:
                line = await asyncio.wait_for(reader.readuntil(b"\n"), READ_TIMEOUT)
            except asyncio.IncompleteReadError as e:  # the client closed; a last request without its newline
                if not e.partial.strip():
                    return
                line = e.partial
            except asyncio.LimitOverrunError:
                writer.write(encode(error(f"malformed request: line longer than {MAX_LINE} bytes")))
                await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT)
                return
            conn.waiting_since = None  # a request: answered, whatever newcomers arrive meanwhile
            try:
                reply = dispatch(self.handler, parse_request(line))
            except RequestError as e:
                reply = error(str(e))
            except Exception as e:  # a bug behind the handler: this request fails, the daemon and its tables stay
                log.exception("control socket: %s failed", line[:80])
                reply = error(f"internal error: {type(e).__name__}: {e}")
            await self._write(writer, reply)
            if reader.at_eof():
                return


    @staticmethod
    async def _write(writer: asyncio.StreamWriter, reply: dict) -> None:
        """One reply line, a piece at a time: each piece written and drained (the client's pace, at most
        WRITE_TIMEOUT per piece), the loop free for the data path in between."""
        pending: list[str] = []
        size = 0
        for piece in reply_chunks(reply):
            pending.append(piece)
            size += len(piece)
            if size >= WRITE_PIECE:
                writer.write("".join(pending).encode())
                pending, size = [], 0
                await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT)
                await asyncio.sleep(0)  # drain() returns at once below the high-water mark: yield anyway
        pending.append("\n")
        writer.write("".join(pending).encode())
        await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT)
