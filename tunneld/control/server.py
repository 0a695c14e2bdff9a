"""The control socket: ``tunneld show`` and ``tunneld peer add|remove`` talk to a running daemon here.

Theory of operation:
  - One unix stream socket per tunnel, ``RUNTIME_DIR/DEV.sock`` (RUNTIME_DIR: ``runtime_dir()``), made with
    mode 0600 (the umask while binding, so there is no moment it is wider) in a directory made 0755 if
    missing. A socket file already there is replaced only when nothing answers on it (a daemon that died);
    if a daemon answers, this one refuses to start in one line rather than steal its clients.
  - Served on worker 0's event loop, beside the data path: every step that can wait (reading a request,
    writing a reply) is awaited with a timeout, every buffer is bounded (a request line ≤ MAX_LINE, at most
    MAX_CLIENTS connections; beyond, a connection is closed at once), so a slow, stuck or hostile client costs
    the data path nothing but a few bytes and a timer.
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
    ``"busy": true`` when MAX_CLIENTS are connected already (the client retries a few times). A request
    that is not JSON, not an object, names an unknown command or key, or carries a bad value gets an error
    reply and changes nothing: it is checked here (``parse_request``) before the handler sees it.
  - The handler (``Handler``) is the tunnel: ``show()``, ``add_peer(PeerSpec)``, ``remove_peer(address)``; it
    raises ConfigError (one line) to refuse. Its calls run on the loop, between two wake-ups of the data path.
  - A ``show`` of a full FDB is 16k entries, ~1.4 MB of JSON: built and encoded at once it would hold the
    loop (and the data path) for hundreds of milliseconds. So its long lists are ``Rows``: a snapshot of the
    items (references, taken at once) turned into JSON ROWS_PER_SLICE at a time, each slice written and
    drained before the next, yielding to the loop in between. The reply is still one JSON object on one line.

The client side (``call``) is blocking and used by the command line only.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import random
import socket
import stat
import struct
import time
from dataclasses import dataclass
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

from tunneld.config.schema import ConfigError
from tunneld.config.checks import check_peer, check_spec
from tunneld.datapath.peers import PeerSpec

log = logging.getLogger("tunneld")

MAX_LINE = 64 * 1024  # bytes in one request line, newline included
READ_TIMEOUT = 5.0  # seconds a client may take to send a whole request line (or sit idle between requests)
WRITE_TIMEOUT = 5.0  # seconds a reply may wait for a client that does not read
MAX_CLIENTS = 64  # connections served at once; one more is closed at once
BUSY_RETRIES = (0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0)  # a client's pauses (s) before it asks a busy daemon again

# Client exit statuses (sysexits(3)), documented in the README and `tunneld show --help`.
EX_FAILURE = 1  # the daemon answered with an error
EX_UNAVAILABLE = 69  # no daemon answers at that socket
EX_NOPERM = 77  # not allowed to talk to it

COMMANDS = ("show", "peer-add", "peer-remove")
KEYS = {"show": frozenset(), "peer-add": frozenset({"address", "name", "routes", "macs"}),
        "peer-remove": frozenset({"address"})}

_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
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


def socket_path(directory: str, dev: str) -> str:
    return os.path.join(directory, f"{dev}.sock")


def find_socket(directory: str, dev: str) -> str:
    """The client's socket for ``dev``: ``DIR/DEV.sock``; failing that, the one ``DIR/*/DEV.sock`` (the systemd
    unit gives each instance its own ``/run/tunneld/NAME``). ControlError when several instances serve DEV."""
    path = socket_path(directory, dev)
    if os.path.lexists(path):
        return path
    try:
        found = sorted(socket_path(entry.path, dev) for entry in os.scandir(directory)
                       if entry.is_dir(follow_symlinks=False) and os.path.lexists(socket_path(entry.path, dev)))
    except OSError:
        return path
    if len(found) > 1:
        raise ControlError(f"{len(found)} sockets for {dev}: {', '.join(found)}; say which with --runtime-dir",
                           EX_UNAVAILABLE)
    return found[0] if found else path


class Handler(Protocol):
    """What the control socket drives: the running tunnel (control/handlers.PeerControl). Each call raises
    ConfigError, one line, to refuse (an unknown address, a route another peer owns, ...), and then changes nothing."""

    def show(self) -> dict: ...

    def add_peer(self, spec: PeerSpec) -> str | None: ...  # a warning for the reply (e.g. a small path MTU)

    def remove_peer(self, address: str) -> None: ...


class ControlError(Exception):
    """The control socket cannot be served (start-up) or reached (client); ``str()`` is one line."""

    def __init__(self, message: str, code: int = EX_FAILURE) -> None:
        super().__init__(message)
        self.code = code


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
    _, uid, _ = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    return uid


def _answers(path: str) -> bool:
    """Whether a process accepts connections on the unix socket at ``path`` (a live daemon, not a stale file).
    Connecting to a unix socket never waits: the kernel says at once whether a listener is bound to it."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
        return True
    except ConnectionRefusedError:
        return False
    except OSError as e:
        # A full backlog (EAGAIN) is a live daemon too busy to accept; anything else: no listener.
        return e.errno in (errno.EAGAIN, errno.EACCES, errno.EPERM)
    finally:
        probe.close()


def _why(e: OSError) -> str:
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{e.strerror}; give --runtime-dir a directory this user may write"
    return e.strerror or str(e)


def bind_socket(path: str) -> socket.socket:
    """The listening socket at ``path``, mode 0600, replacing a stale file; ControlError if a daemon answers
    there, or the path cannot be made."""
    directory = os.path.dirname(path) or "."
    try:
        os.makedirs(directory, mode=0o755, exist_ok=True)
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise ControlError(f"control socket {path}: {_why(e)}") from None
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlError(f"control socket {path}: exists and is not a socket; remove it")
        if _answers(path):
            raise ControlError(f"control socket {path} is in use: another tunneld serves this device")
        os.unlink(path)  # a daemon that died without cleaning up
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # bound as 0600: never readable by others, not even for a moment
    try:
        sock.bind(path)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:  # another daemon bound it between our look and our bind
            raise ControlError(f"control socket {path} is in use: another tunneld serves this device") from None
        raise ControlError(f"control socket {path}: {_why(e)}") from None
    finally:
        os.umask(old)
    sock.listen(MAX_CLIENTS)
    sock.setblocking(False)
    return sock


class ControlServer:
    """The control socket of one tunnel, served on the running event loop (see the module's docstring)."""

    def __init__(self, path: str, handler: Handler, *, uid: int | None = None) -> None:
        self.path = path
        self.handler = handler
        self.uid = os.geteuid() if uid is None else uid  # besides root, the one uid served
        self.clients = 0
        self._server: asyncio.AbstractServer | None = None
        self._inode: tuple[int, int] | None = None
        self._tasks: set[asyncio.Task] = set()

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
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._unlink()

    def _unlink(self) -> None:
        try:
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._inode:  # never remove a file another daemon made since
                os.unlink(self.path)
        except OSError:
            pass

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        self.clients += 1
        try:
            if self.clients > MAX_CLIENTS:
                writer.write(encode(error(f"busy: {MAX_CLIENTS} clients already; try again", busy=True)))
                return
            uid = peer_uid(writer.get_extra_info("socket"))
            if uid not in (0, self.uid):
                writer.write(encode(error(f"permission denied: uid {uid} is neither root nor the daemon's "
                                          f"uid {self.uid}", denied=True)))
                return
            await self._conversation(reader, writer)
        except (ConnectionError, asyncio.TimeoutError, asyncio.CancelledError):
            pass
        except Exception:  # a bug of ours must cost this one client, never the daemon
            log.exception("control socket: client dropped")
        finally:
            self.clients -= 1
            self._tasks.discard(task)
            writer.transport.abort() if writer.transport.get_write_buffer_size() else writer.close()

    async def _conversation(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
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


# -- the client ------------------------------------------------------------------------------------------------


def call(path: str, request: dict, timeout: float = 10.0) -> dict:
    """Send one request to the daemon at ``path`` and return its reply object; ControlError (with the exit
    status for the command line) when there is no daemon, no permission, or no sensible answer."""
    deadline = time.monotonic() + timeout
    for pause in BUSY_RETRIES:  # a daemon at MAX_CLIENTS says "busy" at once: come back a little later
        reply = _call_once(path, request, max(0.1, deadline - time.monotonic()))
        if not reply.get("busy") or time.monotonic() + pause >= deadline:
            break
        time.sleep(pause * (0.5 + random.random()))  # jittered, so that a crowd does not return all at once
    if not reply["ok"]:
        raise ControlError(str(reply.get("error", "refused")), EX_NOPERM if reply.get("denied") else EX_FAILURE)
    return reply


def _call_once(path: str, request: dict, timeout: float) -> dict:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise ControlError(f"no tunneld answers at {path} (is the tunnel running? --runtime-dir?)",
                               EX_UNAVAILABLE) from None
        except PermissionError:
            raise ControlError(f"{path}: permission denied (run as root or as the daemon's user)",
                               EX_NOPERM) from None
        except OSError as e:
            raise ControlError(f"{path}: {e.strerror or e}", EX_UNAVAILABLE) from None
        try:
            try:
                sock.sendall(encode(request))
                sock.shutdown(socket.SHUT_WR)
            except (BrokenPipeError, ConnectionResetError):
                pass  # it answered (refused: busy, another uid) and closed before reading us: read that answer
            data = bytearray()
            while chunk := sock.recv(1 << 16):
                data += chunk
        except socket.timeout:
            raise ControlError(f"{path}: no reply within {timeout:g} s") from None
        except OSError as e:
            raise ControlError(f"{path}: {e.strerror or e}") from None
    finally:
        sock.close()
    try:
        reply = json.loads(data.split(b"\n", 1)[0])
        assert isinstance(reply, dict) and isinstance(reply.get("ok"), bool)
    except (ValueError, AssertionError):
        raise ControlError(f"{path}: not a tunneld reply") from None
    return reply


# -- tunneld show ----------------------------------------------------------------------------------------------


def _bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{n} B"


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    if seconds < 120:
        return f"{seconds:.1f} s ago"
    minutes, s = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return (f"{hours} h " if hours else "") + f"{minutes} min {s} s ago"


def render_show(d: dict) -> str:
    """``tunneld show``'s human text, after ``wg show``: the device, each peer, the FDB."""
    out = [f"device: {d['device']}"]
    for key, label in (("mode", "mode"), ("vni", "vni"), ("listen_port", "listen port"), ("mtu", "mtu"),
                       ("workers", "workers")):
        if d.get(key) is not None:
            out.append(f"  {label}: {d[key]}")
    if "fdb" in d:
        counts = ", ".join(f"{what} {d.get(f'fdb_{what}_total', 0)}" for what in ("learnt", "moved", "refused"))
        out.append(f"  fdb: {len(d['fdb'])} entries (max {d.get('fdb_max', '?')}), {counts}; "
                   f"flooded {d.get('flooded_packets_total', 0)} packets")
    for p in d.get("peers", []):
        out += ["", f"peer: {p['address']}" + (f" ({p['name']})" if p.get("name") else "")]
        out.append(f"  source: {p.get('source', '?')}")
        out.append(f"  state: {p.get('state', '?')}, last heard: {_age(p.get('last_rx_age_s'))}")
        out.append(f"  transfer: {p['rx_packets']} packets / {_bytes(p['rx_bytes'])} received, "
                   f"{p['tx_packets']} packets / {_bytes(p['tx_bytes'])} sent")
        out.append(f"  dropped: {p.get('dropped', 0)}")
        for key in ("routes", "macs"):
            if p.get(key):
                out.append(f"  {key}: {', '.join(p[key])}")
    if d.get("fdb"):
        width = max(len(e["peer"]) for e in d["fdb"])
        out += ["", "fdb:", f"  {'MAC':<17}  {'PEER':<{width}}  {'TYPE':<6}  AGE"]
        for e in d["fdb"]:
            kind = "static" if e["static"] else "learnt"
            age = "-" if e["static"] else f"{e['age_s']:.0f} s"
            out.append(f"  {e['mac']:<17}  {e['peer']:<{width}}  {kind:<6}  {age}")
    return "\n".join(out)
