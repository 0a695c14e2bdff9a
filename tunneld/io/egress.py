"""Kernel segmentation of tunnel super-frames: an egress TAP through which the kernel routes and cuts them.

Why: with offloads on, the device hands us TCP/UDP super-frames of up to 64 KiB, and cutting them into
wire-size datagrams in NumPy (tunneld/offload/segment.py) was ~30 % of the sender's CPU. Since Linux 6.17 a
TAP accepts GSO over UDP tunnels written from userspace (TUN_F_UDP_TUNNEL_GSO, a 24-byte
``virtio_net_hdr_v1_hash_tunnel``: tunneld/offload/vnet.py), as a virtio NIC's guest would hand them over. So
the whole outer packet (Ethernet, outer IPv4, UDP, the codec's constant header, the inner super-frame) is
written into a second TAP of ours, ``<dev>-gso``; the kernel receives it there, routes it towards the peer
like any forwarded packet and segments it on the way out (in software, or in the NIC where it has
tx-udp_tnl-segmentation): inner TCP/UDP headers and checksums per segment, outer IP length, ID, checksum and
outer UDP length and checksum per datagram.

What the host must allow, on that one device only (set over rtnetlink, IFLA_AF_SPEC/IFLA_INET_CONF, as
``ip`` does: the shipped unit makes /proc/sys read-only, and netlink is not /proc/sys):
  - forwarding=1: the packets arrive on the TAP and leave on the underlay. IPv4 asks the INPUT device's
    flag (ip_route_input_slow: IN_DEV_FORWARD(in_dev)), not net.ipv4.ip_forward, so the host forwards
    nothing else; nothing else arrives on this device (it has no address and no route points at it);
  - accept_local=1: the outer source is one of our own addresses (the UDP socket's), a martian otherwise;
  - rp_filter=0: the device has no address, and the reverse-path check fails on such a device
    (__fib_validate_source). The kernel uses max(all, device): with net.ipv4.conf.all.rp_filter set this
    path cannot work and start-up falls back (the log says so). (systemd's sysctl defaults put 2 on the
    devices, which we override on ours, and leave ``all`` at the kernel's 0.)
IPv6 on the device is switched off at its root (IFLA_INET6_ADDR_GEN_MODE none: no link-local address, no
router or neighbour solicitations into a queue nobody reads).

What the packets look like: outer source address and port are exactly what the UDP socket of the socket path
(tunneld cutting super-frames itself) would have used for that flow sends from (same pool, same flow → port
choice: tunneld/io/udp.py), so the peer (a kernel VXLAN or another tunneld) cannot tell the paths apart and
replies reach our socket. Forwarding takes one off the TTL: we write the host's default TTL plus one. Don't
fragment is set, as on the socket.

Detection is by doing, never by kernel version: ``open_egress`` creates the TAP, asks TUNSETOFFLOAD with the
tunnel flags and TUNSETVNETHDRSZ 24 and sets the device's configuration, then reads the effective values back;
any refusal is an ``Unsupported`` with a one-line reason, and the caller keeps today's path.

Only IPv4 underlays for now: an IPv6 underlay falls back. (IPv6 forwards per device only through the
force_forwarding setting of Linux 6.17+, and its acceptance of our own source address is untested here.)
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import os
import socket
import struct
import sys

from tunneld.encap.base import DeviceKind, constant_headers
from tunneld.encap.checksum import ones_complement_sum
from tunneld.io.device import OFFLOADS_UDP_TUNNEL, TUNSETOFFLOAD, TUNSETVNETHDRSZ, Device, DeviceError
from tunneld.offload.layout import (ETH_HLEN, ETHERTYPE_IPV4, ETHERTYPE_IPV6, ETHERTYPE_OFFSET, IPV4_DF, IPV4_HLEN,
                                    PROTO_UDP, UDP_HLEN, pack_ipv4)
from tunneld.offload.vnet import F_NEEDS_CSUM, F_UDP_TUNNEL_CSUM, GSO_UDP_TUNNEL_IPV4, TUNNEL_HDR, TUNNEL_HDR_LEN

IFNAMSIZ = 16  # with the NUL
SUFFIX = "-gso"

# Outer headers written in front of the codec's header: Ethernet, IPv4 without options, UDP.
OUTER_TH = ETH_HLEN + IPV4_HLEN  # outer_th_offset: where the outer UDP header starts
IPV4_MAX = 0xFFFF  # an outer packet beyond the IPv4 length field cannot be written (the socket path takes it)
_UDP = struct.Struct("!HHHH")
PEER_MAC = bytes.fromhex("020000000001")  # source MAC of the frames we write: any unicast will do

# Per-device IPv4 configuration (include/uapi/linux/ip.h IPV4_DEVCONF_*, 1-based in IFLA_INET_CONF).
DEVCONF_FORWARDING, DEVCONF_RP_FILTER, DEVCONF_ACCEPT_LOCAL = 1, 8, 23
EGRESS_DEVCONF = {DEVCONF_FORWARDING: 1, DEVCONF_RP_FILTER: 0, DEVCONF_ACCEPT_LOCAL: 1}
PROC_CONF = "/proc/sys/net/ipv4/conf"


class Unsupported(Exception):
    """The kernel path cannot run here; ``str()`` is the one-line reason for the log."""


def egress_name(dev: str) -> str:
    """``<dev>-gso``, the device name cut to fit IFNAMSIZ (a clash with another tunnel's is refused by the
    kernel: EBUSY, and that tunnel then keeps the socket path)."""
    return dev[: IFNAMSIZ - 1 - len(SUFFIX)] + SUFFIX


# -- rtnetlink: per-device configuration ---------------------------------------------------------------------

NETLINK_ROUTE = 0
RTM_NEWLINK, RTM_SETLINK = 16, 19
NLM_F_REQUEST, NLM_F_ACK = 1, 4
NLMSG_ERROR = 2
IFLA_AF_SPEC = 26
IFLA_INET_CONF = 1
IFLA_INET6_ADDR_GEN_MODE = 8
IN6_ADDR_GEN_MODE_NONE = 1
NLA_F_NESTED = 0x8000
_NLMSG = struct.Struct("=IHHII")
_IFINFO = struct.Struct("=BxHiII")
_NLA = struct.Struct("=HH")


def _nla(kind: int, payload: bytes) -> bytes:
    data = _NLA.pack(_NLA.size + len(payload), kind) + payload
    return data + b"\0" * (-len(data) % 4)


def set_devconf(index: int, conf: dict[int, int], *, ipv6_off: bool = True) -> None:
    """Set IPv4 devconf values on interface ``index`` (and switch its IPv6 address generation off) with one
    RTM_SETLINK carrying IFLA_AF_SPEC: what ``/proc/sys/net/ipv4/conf/<dev>/*`` would set, without /proc/sys.
    OSError with the kernel's errno when refused."""
    inet = _nla(IFLA_INET_CONF | NLA_F_NESTED, b"".join(_nla(k, struct.pack("=I", v)) for k, v in conf.items()))
    spec = _nla(socket.AF_INET | NLA_F_NESTED, inet)
    if ipv6_off:
        spec += _nla(socket.AF_INET6 | NLA_F_NESTED, _nla(IFLA_INET6_ADDR_GEN_MODE, bytes([IN6_ADDR_GEN_MODE_NONE])))
    body = _IFINFO.pack(socket.AF_UNSPEC, 0, index, 0, 0) + _nla(IFLA_AF_SPEC | NLA_F_NESTED, spec)
    msg = _NLMSG.pack(_NLMSG.size + len(body), RTM_SETLINK, NLM_F_REQUEST | NLM_F_ACK, 1, 0) + body
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE) as s:
        s.settimeout(2)
        s.send(msg)
        reply = s.recv(65536)
    _length, kind, _flags, _seq, _pid = _NLMSG.unpack_from(reply)
    if kind == NLMSG_ERROR:
        (code,) = struct.unpack_from("=i", reply, _NLMSG.size)
        if code:
            raise OSError(-code, os.strerror(-code))


def _read_conf(dev: str, name: str) -> int | None:
    try:
        with open(f"{PROC_CONF}/{dev}/{name}") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def check_devconf(dev: str) -> None:
    """Unsupported unless the device's configuration is what the path needs, as the kernel will apply it
    (rp_filter: the larger of ``all`` and the device's). Read from /proc/sys, which stays readable."""
    forwarding, accept_local = _read_conf(dev, "forwarding"), _read_conf(dev, "accept_local")
    rp_dev, rp_all = _read_conf(dev, "rp_filter"), _read_conf("all", "rp_filter")
    if forwarding != 1 or accept_local != 1:
        raise Unsupported(f"{dev}: forwarding={forwarding} accept_local={accept_local} after setting them to 1")
    if rp_all or rp_dev:
        raise Unsupported(f"reverse-path filtering is on (net.ipv4.conf.all.rp_filter={rp_all}, {dev} {rp_dev}); "
                          "the kernel would drop what we route through the egress device")


def default_ttl() -> int:
    """The TTL our UDP sockets send with (the host's default): what a datagram of the socket path carries."""
    try:
        with open("/proc/sys/net/ipv4/ip_default_ttl") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 64


# -- the egress device ---------------------------------------------------------------------------------------


class EgressTap:
    """An open egress TAP: ``send`` writes one inner super-frame, behind its outer headers and the codec's,
    for the kernel to route to ``dest`` and segment. Counters: ``frames`` (super-frames handed over)."""

    def __init__(self, device, *, mac: bytes, header: bytes, source_ports: list[int], port: int,
                 local: str | None, ttl: int | None = None, df: bool = True) -> None:
        self.device = device
        self.name = device.name
        self._fd = device.fileno()
        self._writev = getattr(device, "sys_writev", os.writev)
        self._header = bytes(header)
        self._ports = list(source_ports)
        self._nports = len(self._ports)
        self._local = local
        self._port = port  # the peers' (the tunnel's) UDP port
        # The outer "don't fragment", as the link's sockets send (--df): unset, the kernel fragments each segment
        # that its route cannot carry, as it does the socket's datagrams.
        self._frag = IPV4_DF if df else 0
        # Forwarding takes one off: the datagrams leave with the host's default TTL, as the socket's do.
        self.ttl = min(255, (ttl if ttl is not None else default_ttl()) + 1)
        self._eth = mac + PEER_MAC + ETHERTYPE_IPV4.to_bytes(2, "big")
        self._outer_len = ETH_HLEN + IPV4_HLEN + UDP_HLEN + len(self._header)
        self._prefix = bytearray(TUNNEL_HDR_LEN + self._outer_len)
        self._prefix[TUNNEL_HDR_LEN : TUNNEL_HDR_LEN + ETH_HLEN] = self._eth
        self._prefix[TUNNEL_HDR_LEN + self._outer_len - len(self._header) :] = self._header
        self._view = memoryview(self._prefix)
        # The largest inner IP packet whose outer one still fits the IPv4 length field: what the tunnel's own
        # device may hand us as one super-frame (its gso_max_size) when the kernel cuts them.
        self.superframe_cap = IPV4_MAX - (self._outer_len - ETH_HLEN) - ETH_HLEN
        self._addresses: dict[object, tuple[bytes, bytes, int]] = {}  # dest → (source, destination, their sum)
        self._id = 0
        self.frames = 0

    def fileno(self) -> int:
        return self._fd

    def _addresses_for(self, dest) -> tuple[bytes, bytes, int]:
        """Source and destination addresses for ``dest`` (what the link's ``destination`` made of a peer: an
        (address, port) tuple, or the address): the configured local address, else the one the kernel's route
        picks, as for the socket (a connect sends nothing)."""
        found = self._addresses.get(dest)
        if found is None:
            address = dest[0] if isinstance(dest, tuple) else dest
            source = self._local
            if source is None:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    s.connect((address, self._port))
                    source = s.getsockname()[0]
            src = ipaddress.IPv4Address(source).packed
            dst = ipaddress.IPv4Address(address).packed
            if len(self._addresses) >= 4096:  # peers come and go: keep it bounded
                self._addresses.clear()
            found = self._addresses[dest] = (src, dst, ones_complement_sum(src + dst))
        return found

    def send(self, frame: memoryview, gso_type: int, gso_size: int, csum_start: int, csum_offset: int,
             hlen: int, flow: int, dest) -> bool:
        """Hand the super-frame ``frame`` (an Ethernet frame with an IPv4/IPv6 TCP or UDP payload behind
        ``hlen`` bytes of headers, its checksum partial as the device gave it) to the kernel for ``dest``.
        False when this one cannot go this way (too long for one outer IPv4 packet, an inner header we don't
        place, the kernel refused it): the caller then takes the socket path. OSError other than the kernel's
        refusal (EINVAL) propagates."""
        if frame[ETHERTYPE_OFFSET] << 8 | frame[ETHERTYPE_OFFSET + 1] not in (ETHERTYPE_IPV4, ETHERTYPE_IPV6):
            return False  # a VLAN tag or another ethertype: inner_nh_offset would be wrong
        outer = self._outer_len
        total = outer - ETH_HLEN + len(frame)
        if total > IPV4_MAX:
            return False
        src, dst, addr_sum = self._addresses_for(dest)
        p = self._view
        at = TUNNEL_HDR_LEN + ETH_HLEN
        self._id = ident = (self._id + 1) & 0xFFFF
        pack_ipv4(p, at, total=total, ttl=self.ttl, proto=PROTO_UDP, src=src, dst=dst, ident=ident, frag=self._frag)
        udp_len = total - IPV4_HLEN
        # CHECKSUM_PARTIAL convention: the field holds the folded pseudo-header sum, the kernel adds the rest.
        pseudo = addr_sum + PROTO_UDP + udp_len
        pseudo = (pseudo & 0xFFFF) + (pseudo >> 16)
        pseudo = (pseudo & 0xFFFF) + (pseudo >> 16)
        _UDP.pack_into(p, at + IPV4_HLEN, self._ports[flow % self._nports], self._port, udp_len, pseudo)
        TUNNEL_HDR.pack_into(p, 0, F_NEEDS_CSUM | F_UDP_TUNNEL_CSUM, gso_type | GSO_UDP_TUNNEL_IPV4,
                             outer + hlen, gso_size, outer + csum_start, csum_offset, 0, 0, 0, 0,
                             OUTER_TH, outer + ETH_HLEN)
        try:
            self._writev(self._fd, (p, frame))
        except OSError as e:
            if e.errno == errno.EINVAL:  # the kernel's virtio_net_hdr checks said no: not for this path
                return False
            raise
        self.frames += 1
        return True

    def close(self) -> None:
        self.device.close()


def open_egress(dev: str, *, header: bytes, link, multi_queue: bool = False) -> EgressTap:
    """The egress TAP for the tunnel on ``dev`` whose UDP ``link`` it sends for (its source ports, its local
    address), or Unsupported with the reason this host cannot have it."""
    problem = _host_or_link_problem(link)
    if problem is not None:
        raise Unsupported(problem)
    name = egress_name(dev)
    try:
        device = Device(name, DeviceKind.TAP, offload=True, multi_queue=multi_queue)
    except DeviceError as e:
        raise Unsupported(f"cannot create {name}: {e}") from None
    try:
        try:
            fcntl.ioctl(device.fileno(), TUNSETOFFLOAD, OFFLOADS_UDP_TUNNEL)
        except OSError as e:
            raise Unsupported(f"the kernel refuses GSO over UDP tunnels on a TAP (Linux 6.17+): {e.strerror}") from None
        try:
            fcntl.ioctl(device.fileno(), TUNSETVNETHDRSZ, struct.pack("=i", TUNNEL_HDR_LEN))
        except OSError as e:
            raise Unsupported(f"the kernel refuses a {TUNNEL_HDR_LEN}-byte vnet header: {e.strerror}") from None
        index = _index(name)
        try:  # before it is up: no IPv6 link-local address is ever made
            try:
                set_devconf(index, EGRESS_DEVCONF)
            except OSError as e:
                if e.errno != errno.EAFNOSUPPORT:
                    raise
                set_devconf(index, EGRESS_DEVCONF, ipv6_off=False)  # a host without IPv6
        except OSError as e:
            raise Unsupported(f"cannot configure {name} over netlink: {e.strerror}") from None
        mac = _bring_up(index, name)
        check_devconf(name)
        return EgressTap(device, mac=mac, header=header, source_ports=link.source_ports(), port=link.port,
                         local=link.local, df=getattr(link, "df", True))
    except BaseException:
        device.close()
        raise


def _host_or_link_problem(link) -> str | None:
    if sys.byteorder != "little":
        return "big-endian host: the tunnel vnet header's byte order is not handled"
    if link.family != socket.AF_INET:
        return "IPv6 underlay: not handled by the kernel path yet"
    return None


def _index(name: str) -> int:
    try:
        return socket.if_nametoindex(name)
    except OSError as e:
        raise Unsupported(f"{name} vanished: {e.strerror}") from None


def _bring_up(index: int, name: str) -> bytes:
    """Bring the device up; its MAC (the destination of what we write: the kernel takes only frames addressed
    to the device)."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    with IPRoute() as ipr:
        try:
            ipr.link("set", index=index, state="up")
            link = ipr.get_links(index)[0]
        except (IndexError, NetlinkError) as e:
            raise Unsupported(f"cannot bring {name} up: {e}") from None
    return bytes.fromhex(link.get("IFLA_ADDRESS").replace(":", ""))


def underlay_hazard(dev: str | None) -> str | None:
    """Why segmenting in the kernel would be unsafe towards the underlay device ``dev``, or None.

    A veth hands what it transmits to the other namespace as it is: a UDP-tunnel super-packet arrives there
    unsegmented, and a UDP socket on the far end (a tunneld in a container or test namespace) would take one
    giant datagram for one packet; an inner checksum left partial stays partial. Only when the veth itself
    segments and checksums (tx-udp_tnl-segmentation and tx checksumming off) does the far end get what a NIC
    would send. A real NIC does both, in hardware or in the kernel's software fallback. With no device to look
    at (no peer to route to at start-up: a registry's hosts come later) nothing says the path is safe."""
    if dev is None:
        return "the underlay device is not known at start-up (no peer to route to): its offloads cannot be checked"
    try:
        from pyroute2 import IPRoute
        from pyroute2.ethtool import Ethtool

        with IPRoute() as ipr:
            link = ipr.get_links(ifname=dev)[0]
        info = link.get("IFLA_LINKINFO")
        if info is None or info.get("IFLA_INFO_KIND") != "veth":
            return None
        ethtool = Ethtool()
        try:
            features = ethtool.get_features(dev).features
        finally:
            ethtool.close()
    except Exception as e:  # noqa: BLE001 - any failure to look is a reason not to assume
        return f"cannot read the features of underlay device {dev}: {e}"
    on = [name for name in ("tx-udp_tnl-segmentation", "tx-udp_tnl-csum-segmentation", "tx-checksum-ip-generic")
          if name in features and features[name].enable]
    if on:
        return (f"underlay device {dev} is a veth that passes super-packets and partial checksums to its peer "
                f"as they are ({', '.join(on)} on)")
    return None


def choose(mode: str, *, dev: str, codec, link, underlay_dev: str | None, offload: bool,
           multi_queue: bool = False) -> tuple[EgressTap | None, str]:
    """The egress for ``--kernel-gso MODE`` (auto, on, off), and why, for the start-up log: (None, why not)
    where tunneld keeps cutting. ``on`` raises Unsupported where ``auto`` would fall back, except for the
    underlay hazard, a guess about what lies beyond a veth: there ``on`` goes ahead, and says so."""
    if mode == "off":
        return None, "off (--kernel-gso off)"
    headers = constant_headers(codec)
    if not offload:
        why = "offloads are off"
    elif codec.transport.kind != "udp" or headers is None:
        why = f"{codec.name} has no constant header over UDP"
    elif codec.device is not DeviceKind.TAP:
        why = f"{codec.name} is a TUN mode (the egress device takes Ethernet frames)"
    else:
        why = _host_or_link_problem(link)
    hazard = underlay_hazard(underlay_dev) if why is None else None
    try:
        if why is not None or (hazard is not None and mode != "on"):
            raise Unsupported(why or hazard)
        egress = open_egress(dev, header=headers[0], link=link, multi_queue=multi_queue)
    except Unsupported as e:
        if mode == "on":
            raise
        return None, f"off ({e})"
    return egress, (f"on: super-frames leave whole through {egress.name}, which the kernel forwards from "
                    f"(that device only) and segments; outer TTL {egress.ttl}"
                    + (f"; --kernel-gso on although the {hazard}" if hazard else ""))
