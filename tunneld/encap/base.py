"""The contract every encapsulator (built-in or plugin) fulfils.

An encapsulator is a sans-IO codec: it sees bytes, never sockets, clocks or loggers.

Outbound, the engine reads an inner frame into ``buf[start:end]`` with at least ``header_room`` bytes of
headroom in front of it; ``encap`` writes the encapsulation header in place, directly in front of the frame,
and returns the new start. The payload is never copied.

Inbound, ``decap`` looks at one datagram as the transport delivered it (for UDP: the UDP payload; for raw IP:
whatever the link layer hands up after stripping the outer IP header) and returns either the offset at which
the inner frame starts, or a ``Drop`` naming why the datagram must be discarded. It never raises on input.

Options are declared once, by the codec: ``options`` maps each name to an ``Option`` (type, range or choices,
default, one-line help). The command line's flags and ``--opt NAME=VALUE``, the config file's keys,
``--list-modes`` and ``--help`` are all derived from these declarations, and ``Option.parse`` is the one check
of a value (``tunneld.runtime.modes.build_codec`` applies it once, through ``from_options``).

The fast path (kernel offloads) is declared, never guessed:
- ``constant_header(ip_version)`` is the header ``encap`` lays in front of EVERY frame of that inner IP version
  (TAP codecs: of every frame), whatever its contents and length; or None when there is none (a checksum, a
  sequence number, a length in the header). With a constant header the engine may cut a super-frame into
  packets that all carry it, and expect it in front of rows the kernel coalesced; without one, packets move
  one by one. The conformance kit (tunneld.testing) checks the declaration against ``encap``.
- ``decap_batch(packets, size)`` is the verdict on datagrams laid back to back (each ``size`` bytes, the
  last maybe shorter), as a UDP_GRO read or a run out of recvmmsg delivers them: one verdict per datagram, in
  order. The default asks ``decap`` for each; a codec may answer faster but never differently. The engine
  asks it for every row it received, coalesced or not, so a codec's refusal always holds.
"""

from __future__ import annotations

import abc
import enum
from dataclasses import KW_ONLY, dataclass
from types import MappingProxyType
from typing import Any, ClassVar, Hashable, Mapping

from tunneld.encap.session import HeaderSession, Session


class DeviceKind(enum.Enum):
    """Which kind of kernel device feeds the encapsulator: layer-3 packets (TUN) or Ethernet frames (TAP)."""

    TUN = "tun"
    TAP = "tap"


@dataclass(frozen=True)
class Transport:
    """How the encapsulated packets travel: over UDP to a port, or directly over IP with a protocol number."""

    kind: str  # "udp" or "ip"
    number: int  # default UDP port, or IP protocol number

    def __str__(self) -> str:
        return f"udp/{self.number}" if self.kind == "udp" else f"ip proto {self.number}"


class Drop(str, enum.Enum):
    """Why a packet was discarded. The value is the ``reason`` label exported in metrics."""

    # inbound, from the underlay
    UNKNOWN_PEER = "unknown_peer"  # datagram from an address that is not the configured peer
    TRUNCATED = "truncated"  # shorter than the encapsulation header
    BAD_FLAGS = "bad_flags"  # a required flag missing, or an unknown flag set
    RESERVED_BITS = "reserved_bits"  # reserved fields not zero
    VNI_MISMATCH = "vni_mismatch"  # another VXLAN network
    RUNT_FRAME = "runt_frame"  # the inner frame is too short to be a frame at all
    DEVICE_WRITE_ERROR = "device_write_error"  # the kernel refused the inner frame
    SOURCE_NOT_ALLOWED = "source_not_allowed"  # L3: the inner source lies in none of the sending peer's routes
    # the kernel dropped it before we read it (SO_RXQ_OVFL: mostly a full receive buffer, also its checksum and
    # socket-filter drops)
    KERNEL_RCVBUF = "kernel_rcvbuf"
    # outbound, from the device
    DEVICE_READ_ERROR = "device_read_error"  # reading the device failed (not merely "nothing to read")
    TOO_BIG = "too_big"  # the encapsulated packet would not fit the underlay MTU; VTEPs don't fragment
    SOCKET_ERROR = "socket_error"  # the underlay socket refused the datagram (unreachable, no buffer, ...)
    OFFLOAD_UNSUPPORTED = "offload_unsupported"  # a super-frame or partial checksum we cannot complete
    NO_ROUTE = "no_route"  # L3: the inner destination lies in no peer's routes
    # GRE (RFC 2784, RFC 2890); some apply to any codec that validates the same things
    BAD_VERSION = "bad_version"  # the encapsulation's version field is not one we speak (GRE: not 0)
    BAD_PROTOCOL = "bad_protocol"  # protocol type not carried by this mode, or the inner packet is not of it
    KEY_MISMATCH = "key_mismatch"  # GRE key absent, unexpected, or another tunnel's
    BAD_CHECKSUM = "bad_checksum"  # the encapsulation's checksum does not verify
    SEQUENCE = "sequence"  # an old or duplicate sequence number (RFC 2890 in-order delivery)
    LENGTH_MISMATCH = "length_mismatch"  # the inner IP header's length disagrees with the bytes carried
    # WireGuard (tunneld/encap/wireguard): the core's reasons, under the same names
    BAD_TYPE = "bad_type"  # no message type of the codec's (or its reserved bytes not zero)
    BAD_MAC = "bad_mac"  # a handshake's mac1 does not verify (or there is no private key yet): no answer
    COOKIE_REQUIRED = "cookie_required"  # under load without a valid mac2: only a cookie reply went back
    RATE_LIMITED = "rate_limited"  # a handshake flood from one source, or initiations too close together
    DECRYPTION_FAILED = "decryption_failed"  # an AEAD tag or a key exchange refused
    REPLAYED = "replayed"  # a counter already seen or behind the replay window; an initiation not newer
    NO_SESSION = "no_session"  # a receiver index not handed out, or whose keys are gone
    EXPIRED_KEYS = "expired_keys"  # a session older than REJECT_AFTER_TIME (180 s)


_TRUE = ("1", "yes", "true", "on")
_FALSE = ("0", "no", "false", "off", "")
_KINDS = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "table"}


def describe_value(value: Any) -> str:
    """``integer 10``, ``string 'x'``: how a value that has the wrong type is named in an error line."""
    return f"{_KINDS.get(type(value), type(value).__name__)} {value!r}"


@dataclass(frozen=True)
class Option:
    """One option of a mode: its name, type (``int``, ``bool`` or ``str``; ``None``: untyped), range or
    choices, default and one-line help.

    Two ways in, one rule: ``check`` takes a typed value (a config file's, a built-in flag's once parsed) and
    refuses the wrong type; ``parse`` also takes the string the command line gives (``--opt NAME=VALUE``).
    Both raise ValueError with one line for the operator (without the option's name: the caller says where).
    An untyped option (``kind=None``) passes any value through as given: its codec's ``from_options`` judges it.
    """

    name: str
    kind: type | None
    help: str
    _: KW_ONLY
    default: Any = None
    low: int | None = None
    high: int | None = None
    choices: tuple[str, ...] = ()
    label: str = ""  # what a value is called in messages ("VNI"); the name when empty

    def __post_init__(self) -> None:
        if self.kind not in (None, int, bool, str):
            raise TypeError(f"option {self.name}: kind must be int, bool, str or None, not {self.kind!r}")
        if not isinstance(self.help, str) or "\n" in self.help or not self.help.strip():
            raise ValueError(f"option {self.name}: help must be one non-empty line")
        object.__setattr__(self, "choices", tuple(self.choices))
        if not self.label:
            object.__setattr__(self, "label", self.name)

    def expects(self) -> str:
        """What a good value looks like, e.g. ``an integer VNI (0-16777215)``, ``true or false``."""
        if self.kind is bool:
            return "true or false"
        if self.choices:
            return "one of " + ", ".join(self.choices)
        if self.kind is int:
            bounds = f" ({self.low}-{self.high})" if self.low is not None and self.high is not None else ""
            return f"an integer {self.label}{bounds}"
        return "a string" if self.kind is str else "any value"

    def check(self, value: Any) -> Any:
        """A typed value (a config file's): the value, or ValueError naming what is wrong and what is allowed."""
        kind = self.kind
        if kind is None:
            return value
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ValueError(f"expected {self.expects()}, got {describe_value(value)}")
        if kind is int and not self._in_range(value):
            raise ValueError(f"{value} is out of range ({self.low}-{self.high})")
        if self.choices and value not in self.choices:
            raise ValueError(f"{value!r} is not one of {', '.join(self.choices)}")
        return value

    def parse(self, value: Any) -> Any:
        """A typed value, or the string the command line gives: the value, or ValueError (one line)."""
        if not isinstance(value, str) or self.kind in (None, str):
            return self.check(value)
        text = value.strip()
        if self.kind is bool:
            if text.lower() in _TRUE:
                return True
            if text.lower() in _FALSE:
                return False
            raise ValueError(f"{value!r} is not yes/no")
        try:
            number = int(text, 0)
        except ValueError:
            raise ValueError(f"{value!r} is not a number") from None
        if not self._in_range(number):
            raise ValueError(f"{self.label} must be between {self.low} and {self.high}, got {number}")
        return number

    def _in_range(self, number: int) -> bool:
        return (self.low is None or number >= self.low) and (self.high is None or number <= self.high)

    def summary(self) -> str:
        """Type, range and default in a few words, for --list-modes and --help: ``0-16777215, default 1``."""
        if self.kind is bool:
            kind = "yes/no"
        elif self.choices:
            kind = "|".join(self.choices)
        elif self.kind is int and self.low is not None and self.high is not None:
            kind = f"{self.low}-{self.high}"
        else:
            kind = {int: "integer", str: "string"}.get(self.kind, "as given")
        default = self.default
        if default is None or isinstance(default, bool):  # not a dict lookup: 1 == True would match
            default = "unset" if default is None else ("yes" if default else "no")
        return f"{kind}, default {default}"


def declare(*options: Option) -> Mapping[str, Option]:
    """An encapsulator's ``options``: the declarations by name, read-only."""
    names = [o.name for o in options]
    if len(set(names)) != len(names):
        raise ValueError(f"options declared twice: {sorted(n for n in names if names.count(n) > 1)}")
    return MappingProxyType({o.name: o for o in options})


def declared(cls: type) -> Mapping[str, Option]:
    """A mode's option declarations, whatever their form.

    A plugin written before ``Option`` existed declares ``options`` as name -> help text; each such entry is
    read as an untyped ``Option`` (values reach its ``from_options`` as given, as they always did). That form is
    deprecated: ``is_legacy`` tells, and the command line warns."""
    return MappingProxyType({
        name: value if isinstance(value, Option) else Option(name, None, str(value))
        for name, value in (getattr(cls, "options", None) or {}).items()
    })


def is_legacy(cls: type) -> bool:
    """True if ``cls`` declares options the deprecated way (name -> plain help string)."""
    return any(not isinstance(v, Option) for v in (getattr(cls, "options", None) or {}).values())


def parse_options(cls: type, given: Mapping[str, Any]) -> dict[str, Any]:
    """Every option ``cls`` declares, parsed from ``given`` (absent or None: its default); undeclared names
    are not looked at (``tunneld.runtime.modes.build_codec`` refuses them first). ValueError says "NAME: problem"."""
    values = {}
    for name, option in declared(cls).items():
        raw = given.get(name)
        try:
            values[name] = option.default if raw is None else option.parse(raw)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
    return values


# IPv4 and IPv6 header sizes without options, for MTU arithmetic.
IPV4_HEADER_LEN = 20
IPV6_HEADER_LEN = 40
UDP_HEADER_LEN = 8
ETHERNET_HEADER_LEN = 14


def rows_agree(packets: memoryview, size: int, at: int, expect: bytes, rows: int) -> bool:
    """Whether the first ``rows`` datagrams of ``packets`` (``size`` bytes each) all hold ``expect`` at offset
    ``at``. Byte j of every row is the strided slice ``packets[at + j :: size]``: one C-level comparison per
    byte of ``expect``, none per row; what ``decap_batch`` overrides use to judge a whole batch at once."""
    stop = rows * size
    for j in range(len(expect)):  # a loop, not all(genexpr): no generator frame per byte
        if packets[at + j : stop : size] != expect[j : j + 1] * rows:
            return False
    return True


class Encapsulator(abc.ABC):
    """Base class of every mode. Subclasses set the class attributes and implement ``encap``/``decap``."""

    name: ClassVar[str]  # the --mode value
    description: ClassVar[str]  # one line, shown by --list-modes
    device: ClassVar[DeviceKind]
    transport: ClassVar[Transport]
    header_room: ClassVar[int]  # the most bytes ``encap`` may write in front of a frame
    # The mode's options, declared once (``declare(Option(...), ...)``): the flags, config keys, --list-modes
    # and --help lines are derived from them. Values reach ``from_options`` as given (typed from a config file
    # or a flag, strings from --opt); an option the mode does not declare is refused before it is built.
    options: ClassVar[Mapping[str, Option]] = declare()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # A declaration holds for the code it was written with. A subclass that rewrites ``encap`` (or
        # ``decap``) but not the declaration beside it (``constant_header``, ``decap_batch``) gets the safe
        # defaults back: no fast path, and a verdict that asks its own ``decap`` for every datagram. (A VXLAN
        # plugin refusing some frames must not be overruled by VXLAN's vectorised verdict.)
        super().__init_subclass__(**kwargs)
        if "encap" in cls.__dict__ and "constant_header" not in cls.__dict__:
            cls.constant_header = Encapsulator.constant_header  # type: ignore[method-assign]
        if "decap" in cls.__dict__ and "decap_batch" not in cls.__dict__:
            cls.decap_batch = Encapsulator.decap_batch  # type: ignore[method-assign]
        # Sessions too: one inherited from a stateful codec would seal and open with the parent's code, past the
        # subclass's own ``encap``/``decap``. Without a ``session`` of its own, the subclass is served by its
        # ``encap``/``decap`` through the one HeaderSession (whatever state they keep is the codec's own).
        if ("encap" in cls.__dict__ or "decap" in cls.__dict__) and "session" not in cls.__dict__:
            cls.session = Encapsulator.session  # type: ignore[method-assign]
            cls.stateful = Encapsulator.stateful  # type: ignore[assignment]

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> "Encapsulator":
        """Build the codec from the tunnel's options; raise ValueError (one line for the operator) when invalid.

        ``options`` maps names to values as given (other settings, such as ``port``, may be present too). The
        default parses every declared option (``parse_options``) and passes them to the constructor by name.
        """
        return cls(**parse_options(cls, options))

    def describe(self) -> str:
        """This instance's settings for the start-up log line, e.g. ``key 42, seq``; empty when none."""
        return ""

    # -- per-peer sessions (tunneld/encap/session.py) -----------------------------------------------------------

    tail_room: ClassVar[int] = 0  # the most bytes a session may write behind a frame
    align: ClassVar[int] = 1  # sealed frames are padded to a multiple of this (the overhead counts the worst case)
    # Whether padding stops at the largest frame the path carries (the session's ``set_frame_limit``), as
    # WireGuard's does (wireguard-go pads to 16 but never past the device MTU): then the overhead does not count
    # it, and a frame of exactly the limit is sealed with no padding at all and still fits the underlay.
    pads_within_limit: ClassVar[bool] = False
    keyed: ClassVar[bool] = False  # the peer is found by ``peer_key(packet)``, not by the source address
    # Whether this stateful codec's sessions seal rows and the codec opens them (``open_rows``): then it takes
    # the offload path (tunneld/encap/session.py, "Rows").
    rows: ClassVar[bool] = False
    # Whether a stateful codec's sessions may be spread over worker processes (False: the tunnel runs one
    # worker). Stateless codecs keep nothing per peer and always spread.
    spreads: ClassVar[bool] = True

    def session(self, peer_id: str) -> Session:
        """The state this codec keeps about the peer ``peer_id``. The default is the codec's one stateless
        ``HeaderSession`` (``encap``/``decap``), shared by every peer; a codec with per-peer state returns a
        new ``Session`` of its own."""
        shared = self.__dict__.get("_header_session")
        if shared is None:
            shared = self.__dict__["_header_session"] = HeaderSession(self)
        return shared

    @property
    def stateful(self) -> bool:
        """Whether this codec keeps per-peer sessions (it overrides ``session``): packets then move one by one
        through each peer's session, and never through the constant-header fast path."""
        return type(self).session is not Encapsulator.session

    def identify(self, packet: memoryview, source: str, now: float, port: int = 0):
        """What the engine asks of a keyed codec: ``peer_key(packet)``, unless the codec needs the datagram's
        source (address, and ``port``: 0 where the link has none) and the time to say whose it is (WireGuard
        runs its handshake here). Besides a peer id or a Drop it
        may return an ``Answer``: packets for the source, which names no peer (tunneld/encap/session.py)."""
        return self.peer_key(packet)

    def cost(self, packet: memoryview, verdict) -> int:
        """What a datagram ``identify`` judged (``verdict``: what it said) weighs against the engine's wake-up
        budget: its length, unless judging it took much more work than its bytes (WireGuard: a handshake's
        X25519), so that a flood of such datagrams yields to the loop sooner."""
        return len(packet)

    def peer_key(self, packet: memoryview) -> Hashable | Drop:
        """A keyed codec's answer to "whose packet is this?" (a header field, a key index): the ``peer_id`` of a
        session it made, or a Drop (a key no peer holds: ``unknown_peer``). Only asked when ``keyed``."""
        raise NotImplementedError(f"{self.name}: keyed codecs name the peer of a packet")

    @property
    def trailer_len(self) -> int:
        """Bytes this instance adds behind each inner frame at most, padding included (unless the padding stays
        within the frame limit: ``pads_within_limit``)."""
        return self.tail_room

    @property
    @abc.abstractmethod
    def header_len(self) -> int:
        """Bytes this instance adds in front of each inner frame (may depend on its options)."""

    def outer_overhead(self, underlay_ipv6: bool) -> int:
        """Bytes the underlay adds around a whole inner frame: outer IP, transport and this header."""
        ip = IPV6_HEADER_LEN if underlay_ipv6 else IPV4_HEADER_LEN
        transport = UDP_HEADER_LEN if self.transport.kind == "udp" else 0
        padding = 0 if self.pads_within_limit else self.align - 1
        return ip + transport + self.header_len + self.trailer_len + padding

    def overhead(self, underlay_ipv6: bool) -> int:
        """Bytes between the underlay MTU and the MTU the device can be given (``ip link``'s view).

        A TAP device's MTU excludes its Ethernet header, which the tunnel carries too (VXLAN: 50 over IPv4).
        """
        link = ETHERNET_HEADER_LEN if self.device is DeviceKind.TAP else 0
        return self.outer_overhead(underlay_ipv6) + link

    @abc.abstractmethod
    def encap(self, buf: bytearray, start: int, end: int) -> int | Drop:
        """Write the header in front of ``buf[start:end]``; return the start of the encapsulated packet.

        A codec that cannot carry a frame (GRE: a TUN packet that is neither IPv4 nor IPv6) returns a ``Drop``.
        """

    @abc.abstractmethod
    def decap(self, packet: memoryview) -> int | Drop:
        """Validate one received packet; return the offset of the inner frame, or why it is dropped."""

    def constant_header(self, ip_version: int) -> bytes | None:
        """The header ``encap`` lays in front of every frame of inner IP version ``ip_version`` (4 or 6; a TAP
        codec answers the same for both), or None: no fast path, packets move one by one. A codec that states
        one must keep to it for every frame: offloaded packets are built from this declaration, not by
        ``encap``."""
        return None

    def decap_batch(self, packets: memoryview, size: int) -> list[int | Drop]:
        """``decap``'s verdict on each datagram of ``packets`` (``size`` bytes each, the last maybe shorter)."""
        decap = self.decap
        return [decap(packets[i : i + size]) for i in range(0, len(packets), size)]


def session_of(codec: Encapsulator, peer_id: str) -> Session:
    """``codec.session(peer_id)``, asked of its class: a plugin written for the header-only contract may keep an
    instance attribute that happens to be named ``session`` (the ipudp example's session number), which hides
    the method on the instance. The class's method is the contract."""
    return type(codec).session(codec, peer_id)


def constant_headers(codec: Encapsulator) -> tuple[bytes, bytes] | None:
    """The headers ``codec`` declares in front of every IPv4 and every IPv6 frame, when it declares both and
    they are ``header_len`` bytes long (the offload path lays one before every row and expects it there);
    None: the codec moves packets one by one."""
    h4, h6 = codec.constant_header(4), codec.constant_header(6)
    if h4 is None or h6 is None or not len(h4) == len(h6) == codec.header_len:
        return None
    return bytes(h4), bytes(h6)
