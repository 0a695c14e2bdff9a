"""The tunnel's configuration as values: the frozen ``TunnelConfig``, its defaults and the bounds every check
uses. Nothing here judges a value (config/checks.py does) or reads a file (config/loading.py does).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from tunneld.control.client import DEFAULT_RUNTIME_DIR  # the control socket's: declared where the light client reads it
from tunneld.datapath.peers import DEFAULT_ROUTES, PeerSpec  # DEFAULT_ROUTES: what the peer table gives a lone L3 peer

if TYPE_CHECKING:  # the registry's settings are its own (control/registry.py); a config only holds them
    from tunneld.control.registry import RegistryConfig

DEFAULT_DEV = "tunneld0"
DEFAULT_MODE = "vxlan"
DEFAULT_METRICS_LISTEN = "127.0.0.1:9477"  # loopback only: exposing metrics further is the operator's choice
IFNAMSIZ = 16  # including the terminating NUL
LOG_LEVELS = ("debug", "info", "warning", "error")
MIN_MTU = 68  # RFC 791's minimum
IPV6_MIN_MTU = 1280  # RFC 8200: an interface carrying IPv6 needs at least this

# Peers and what they carry: every list that a file can grow has a bound (a file is at most MAX_CONFIG_BYTES).
MAX_PEERS = 4096  # one device and one socket carry them all; the data path keeps a table entry per peer
MAX_ROUTES_PER_PEER = 1024  # L3 modes: inner prefixes per peer
MAX_MACS_PER_PEER = 1024  # L2 modes: static FDB entries per peer
MAX_NAME = 64  # a peer's label, shown by `tunneld show`
DEFAULT_FDB_MAX = 16384  # L2 modes: FDB entries, learnt and static (Linux vxlan's `limit` is unbounded by default)
MAX_FDB_MAX = 1_000_000
DEFAULT_FDB_AGEING = 300.0  # seconds a learnt MAC lives unheard, as Linux bridges and vxlan; 0 = never
MAX_FDB_AGEING = 1_000_000.0
SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes with the terminating NUL
# Outer "don't fragment": "set" (the default) as RFC 7348 asks of a VTEP; a frame too big for the path is
# answered with ICMP so the inner sender shrinks it. "unset": the kernel and the path's routers fragment outer
# packets, for paths that drop ICMP (the kernel's VXLAN defaults to that). io/udp.py says how, per IP version.
DF_CHOICES = ("set", "unset")
DEFAULT_DF = "set"
DF_HELP = ("outer 'don't fragment': 'set' (default: a VTEP must not fragment, RFC 7348; a frame too big for the "
           "path is answered with ICMP frag-needed/packet-too-big so its sender shrinks it) or 'unset' (the "
           "kernel and the routers fragment outer packets, for paths that drop ICMP; IPv6 routers never do)")
KERNEL_GSO_CHOICES = ("auto", "on", "off")  # see TunnelConfig.kernel_gso
MAX_WORKERS = 64  # processes; one TUN queue each (the kernel allows 256) and ~50 MB of Python each
EX_CONFIG = 78  # sysexits.h EX_CONFIG: the exit status of a configuration error; systemd must not restart on it


class ConfigError(ValueError):
    """One problem with the configuration; str() is the line shown to the operator."""


@dataclass(frozen=True)
class TunnelConfig:
    """One tunnel. ``peers``: the far ends in the order given (canonical addresses, no duplicates once
    validated). ``TunnelConfig(peer="ADDR", ...)`` (and ``dataclasses.replace(cfg, peer=ADDR)``) is the
    one-peer shorthand: it sets ``peers`` to that one peer; ``cfg.peer`` reads the first peer's address."""

    peers: tuple[PeerSpec, ...] = ()
    mode: str = DEFAULT_MODE
    local: str | None = None
    dev: str = DEFAULT_DEV
    addresses: tuple[str, ...] = ()
    port: int | None = None  # None: the mode's default UDP port (VXLAN: 4789); only for modes over UDP
    mtu: int | None = None  # None: underlay MTU minus the encapsulation overhead
    mac: str | None = None  # None: a stable address derived from the machine, the device name and the peer
    log_level: str = "info"
    offload: bool = True  # TUN/TAP TSO + UDP GSO/GRO (tunneld/offload); False: the plain per-packet path
    # Who cuts super-frames of UDP codecs with a constant header (VXLAN): the kernel through an egress TAP
    # (tunneld/io/egress.py), or tunneld. "auto": the kernel where it can and it is safe; "on": the kernel or
    # fail to start; "off": tunneld. Command line only (--kernel-gso) for now: a file takes the default.
    kernel_gso: str = "auto"
    df: str = DEFAULT_DF  # outer "don't fragment": "set" or "unset" (DF_HELP)
    workers: int | str = "auto"  # data-path processes (tunneld/runtime/workers.py); "auto": decided from the CPUs
    metrics_listen: str = DEFAULT_METRICS_LISTEN  # HOST:PORT or [IPv6]:PORT of the /metrics endpoint; "" = off
    fdb_max: int = DEFAULT_FDB_MAX  # L2 modes: at most this many FDB entries; past it MACs are not learnt
    fdb_ageing: float = DEFAULT_FDB_AGEING  # L2 modes: seconds before an unheard learnt MAC expires; 0 = never
    runtime_dir: str = DEFAULT_RUNTIME_DIR  # where the control socket DEV.sock lives
    registry: RegistryConfig | None = None  # membership through etcd (tunneld/control/registry.py); None: static peers only
    # The mode's options (vxlan: vni; gre: key, seq, csum; a plugin's: its own), as given: typed from a config
    # file or a flag, strings from --opt. The mode's declarations judge them (tunneld.runtime.modes.build_codec).
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def peer(self) -> str:
        """The first peer's address ("" when there is none): for the one-peer paths that need one name (the
        stable MAC, a status line); code that carries traffic iterates ``peers``."""
        return self.peers[0].address if self.peers else ""

    def options(self) -> dict[str, Any]:
        """What the encapsulator is built from: the mode's options, and ``port`` for plugins that read it."""
        return {"port": self.port, **self.extra}

    def changed(self, other: "TunnelConfig") -> list[str]:
        """The settings that differ from ``other``: field names, and each mode option by its own name."""
        names = []
        for f in fields(self):
            if f.name == "extra":
                names += [k for k in {**other.extra, **self.extra} if self.extra.get(k) != other.extra.get(k)]
            elif getattr(self, f.name) != getattr(other, f.name):
                names.append(f.name)
        return names


_dataclass_init = TunnelConfig.__init__


def _init(self: TunnelConfig, *args: Any, peer: str | None = None, **kwargs: Any) -> None:
    # ``peer=`` is not a field (it is a view of ``peers``), so the generated __init__ would refuse it; it stays
    # accepted because every one-peer caller (tests, plugins' helpers, a file's [tunnel] peer) says it that way.
    if peer is not None:
        kwargs["peers"] = (PeerSpec(peer),)
    _dataclass_init(self, *args, **kwargs)


TunnelConfig.__init__ = _init  # type: ignore[method-assign]
