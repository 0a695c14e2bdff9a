"""What a tunnel will be, decided before anything is opened: config + modes → codec, MTUs, workers, offload.

The plan is a value. Building it opens nothing and creates nothing: the two facts it needs from the machine,
the underlay route's MTU towards each peer and the CPUs the process may use, come from functions passed in
(the real ones by default), so every decision here can be tested without root. Its errors are StartupErrors,
one line each, raised before any socket or device exists.

With several peers one device carries frames to all of them, so its MTU (unless configured) and the largest
frame the links take come from the smallest route MTU towards any peer; the log names the peer that limits
it. The stable MAC is derived from the first configured peer, so adding peers to a file keeps the address.

Errors:
  - the mode and its options (modes.build_codec): exit status 78, or 1 for a plugin's own failure;
  - an MTU that leaves no room for a tunnel: 78;
  - a transport the daemon has no link for: 1.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tunneld.config.schema import MIN_MTU, TunnelConfig
from tunneld.encap.base import DeviceKind, Encapsulator
from tunneld.datapath.engine import offload_supported
from tunneld.errors import EX_CONFIG, StartupError
from tunneld.io import netlink
from tunneld.io.udp import GSO_MAX_BYTES, GSO_MAX_SEGMENTS
from tunneld.runtime.modes import EncapsulatorFailed, ModeOptionError, build_codec, vni
from tunneld.runtime.workers import resolve

log = logging.getLogger("tunneld")

SUPERFRAME_HEADERS = 14 + 40 + 32  # Ethernet, IPv6, TCP with timestamps: the usual headers of a segment
TRANSPORTS = ("udp", "ip")  # the links there are (io/udp.py, io/raw.py)


def _machine_id() -> bytes:
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            return Path(path).read_bytes().strip()
        except OSError:
            continue
    return b""


def stable_mac(*parts: object, machine_id: bytes | None = None) -> str:
    """A locally administered unicast MAC derived from the machine and the tunnel's identity.

    A TAP device otherwise gets a random MAC each time it is created, and after a restart the neighbours'
    ARP/ND caches (and a kernel VXLAN peer's FDB) would point at the old one until they expire. Deriving it
    like systemd's MACAddressPolicy=persistent keeps a restarted daemon looking like the same interface.
    The (first) peer is part of the identity so that two ends on one machine (namespaces) never collide.
    """
    mid = _machine_id() if machine_id is None else machine_id
    digest = hashlib.sha256(b"tunneld\0" + mid + b"\0" + "\0".join(map(str, parts)).encode()).digest()
    first = (digest[0] & 0xFE) | 0x02  # unicast, locally administered
    return ":".join(f"{b:02x}" for b in (first, *digest[1:6]))


@dataclass(frozen=True)
class Plan:
    cfg: TunnelConfig
    codec: Encapsulator  # worker 0's; a forked worker carries its own copy (codecs may keep state: GRE's seq)
    underlay_mtu: int
    underlay_dev: str | None  # the route's interface towards the limiting peer; None: no route yet
    mtu: int  # the interface's
    max_frame: int  # the largest inner frame whose encapsulation fits the underlay MTU
    workers: int
    workers_note: str | None  # a line for the log when the workers are not simply what was asked
    offload: bool
    port: int  # UDP port, or the IP protocol number of a raw-IP transport
    mac: str | None  # TAP only
    limiting_peer: str | None = None  # the peer whose path MTU is the smallest (None: no peers)

    @property
    def vni(self) -> int | None:
        return vni(self.codec)  # the metrics' info label; modes without one have none

    def superframe_cap(self) -> int:
        """The largest super-frame the device should hand us: what ONE UDP_SEGMENT sendmsg carries (≤ 64
        datagrams, ≤ ~64 KB of them); 64 KiB frames would leave as 44 + 3 datagrams, costing the receiver a
        second read and write. 0 or less: no cap worth setting."""
        row = self.max_frame + self.codec.header_len + self.codec.trailer_len  # a sealed row's padding and tag too
        rows = min(GSO_MAX_SEGMENTS, GSO_MAX_BYTES // row)
        return rows * (self.max_frame - SUPERFRAME_HEADERS)


def make_plan(
    cfg: TunnelConfig,
    modes: dict[str, type[Encapsulator]],
    *,
    underlay_mtu: Callable[[str], tuple[int, str | None]] | None = None,
    cpus: int | None = None,
    machine_id: bytes | None = None,
) -> Plan:
    """The plan for ``cfg``; StartupError if it cannot be carried out. ``underlay_mtu(peer)`` → (MTU, interface)
    defaults to the kernel's route lookup; ``cpus`` (for --workers auto) to the CPUs usable by this process."""
    try:
        codec = build_codec(cfg, modes)
    except (ModeOptionError, EncapsulatorFailed) as e:
        raise StartupError(str(e), e.code) from None
    addresses = [spec.address for spec in cfg.peers]
    underlay_v6 = bool(addresses) and ipaddress.ip_address(addresses[0]).version == 6  # one family: validated
    if underlay_mtu is None:  # one netlink socket for all of them (looked up at call time: a test may patch it)
        found = netlink.underlay_mtus(addresses)
    else:
        found = [underlay_mtu(address) for address in addresses]
    link_mtu, underlay_dev, limiting = netlink.DEFAULT_UNDERLAY_MTU, None, None
    for address, (path_mtu, dev) in zip(addresses, found):
        if dev is None:
            log.warning("no route to peer %s yet; assuming an underlay MTU of %d", address, path_mtu)
        if limiting is None or path_mtu < link_mtu:
            link_mtu, underlay_dev, limiting = path_mtu, dev, address
    if len(addresses) > 1:
        log.info("underlay MTU %d: the smallest path MTU, towards peer %s", link_mtu, limiting)
    overhead = codec.overhead(underlay_v6)
    default_mtu = link_mtu - overhead
    mtu = cfg.mtu or default_mtu
    if mtu > default_mtu:
        log.warning(
            "mtu %d exceeds what the underlay carries (%d - %d overhead = %d): larger frames will be dropped",
            mtu, link_mtu, overhead, default_mtu,
        )
    if mtu < MIN_MTU:
        raise StartupError(f"the underlay MTU {link_mtu} leaves no room for a tunnel", EX_CONFIG)
    if codec.transport.kind not in TRANSPORTS:
        raise StartupError(f"{cfg.mode}: transport {codec.transport} is not supported")
    workers, note = resolve(cfg.workers, codec.transport.kind, cpus, spreads=codec.spreads or not codec.stateful)
    mac = None
    if codec.device is DeviceKind.TAP:
        # 1 for a mode without a VNI, so that its MAC stays what running tunnels have. The first peer, as with
        # one, so adding peers keeps the MAC; with none (a registry's members come later) the tunnel is named by
        # its device, mode, underlay address (the one it registers: namespaces of one machine share its
        # machine-id) and VNI.
        identity = (cfg.dev, cfg.mode, cfg.peer, vni(codec, default=1)) if cfg.peers else (
            cfg.dev, cfg.mode, *([cfg.local] if cfg.local else []), vni(codec, default=1))
        mac = cfg.mac or stable_mac(*identity, machine_id=machine_id)
    return Plan(
        cfg=cfg,
        codec=codec,
        underlay_mtu=link_mtu,
        underlay_dev=underlay_dev,
        mtu=mtu,
        max_frame=link_mtu - codec.outer_overhead(underlay_v6),
        workers=workers,
        workers_note=note,
        # Offloads need a header that is the same for every frame (VXLAN, GRE without checksums or sequence numbers).
        offload=cfg.offload and offload_supported(codec),
        port=cfg.port or codec.transport.number,
        mac=mac,
        limiting_peer=limiting,
    )
