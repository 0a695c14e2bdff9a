"""TUN/TAP devices, opened with pytun-pmd3.

The device is created by TUNSETIFF and lives exactly as long as its file descriptor: closing it (or the
process dying, even by SIGKILL) removes the interface. The fd is non-blocking; the engine drains it from the
event loop's reader callback.

``read_into``/``write`` take buffers so the engine can read a frame straight into a preallocated buffer
behind headroom, and write a slice of a received datagram without copying it.

With ``offload=True`` the device is opened with IFF_VNET_HDR and TUNSETOFFLOAD (checksum, TSO4/6 and, where
the kernel has it, USO4/6): every read and write then starts with a 10-byte ``virtio_net_hdr``
(tunneld/offload/vnet.py) and reads may return TCP/UDP super-frames of up to 64 KiB.

With ``multi_queue=True`` (IFF_MULTI_QUEUE) the first open creates the interface and each further open of the
same name adds one queue (one fd) to it; the kernel spreads the frames it transmits over the queues by flow
hash (tun_select_queue). The flags, offloads included, must be the same on every queue; the interface goes
away when the last queue's fd closes. tunneld/runtime/workers.py gives each worker process one queue.
"""

from __future__ import annotations

import errno
import fcntl
import grp
import os
import pwd
import stat

from pytun_pmd3.linux import IFF_NO_PI, IFF_TAP, IFF_TUN, IFF_VNET_HDR, PytunError, TunTapDevice

IFF_MULTI_QUEUE = 0x0100  # include/uapi/linux/if_tun.h: every TUNSETIFF with the same name adds a queue

from tunneld.encap.base import DeviceKind
from tunneld.io import SetupError


TUNSETOFFLOAD = 0x400454D0  # _IOW('T', 208, unsigned int), include/uapi/linux/if_tun.h; value argument
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_USO4 = 0x20  # Linux 6.2+
TUN_F_USO6 = 0x40
TUN_F_UDP_TUNNEL_GSO = 0x80  # Linux 6.17+: TSO/USO over a UDP tunnel (needs a plain TSO/USO flag too)
TUN_F_UDP_TUNNEL_GSO_CSUM = 0x100  # ... with the outer UDP checksum computed per segment
OFFLOADS_TCP = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6
OFFLOADS_ALL = OFFLOADS_TCP | TUN_F_USO4 | TUN_F_USO6
OFFLOADS_UDP_TUNNEL = OFFLOADS_ALL | TUN_F_UDP_TUNNEL_GSO | TUN_F_UDP_TUNNEL_GSO_CSUM
TUNSETVNETHDRSZ = 0x400454D8  # _IOW('T', 216, int); pointer argument: 24 for virtio_net_hdr_v1_hash_tunnel


class DeviceError(SetupError):
    """The device could not be created; the message is meant for the operator."""


TUN_NODE = "/dev/net/tun"  # the path pytun opens
CAP_NET_ADMIN = 12  # include/uapi/linux/capability.h


def _node_denied() -> str:
    """Why opening the device node was refused: its permissions, and whether CAP_NET_ADMIN is held (the
    capability alone does not open a node the user may not read and write)."""
    try:
        st = os.stat(TUN_NODE)
        mode = f"mode {stat.S_IMODE(st.st_mode):04o} {_name(pwd.getpwuid, st.st_uid)}:{_name(grp.getgrgid, st.st_gid)}"
    except OSError as e:
        mode = e.strerror or str(e)
    cap = "CAP_NET_ADMIN is held" if _has_cap(CAP_NET_ADMIN) else "CAP_NET_ADMIN is not held either"
    return (f"cannot open {TUN_NODE}: permission denied ({mode}); {cap}: let this user read and write the node "
            "(its group or an ACL), or run as root")


def _name(lookup, ident: int) -> str:
    try:
        return lookup(ident)[0]
    except KeyError:
        return str(ident)


def _has_cap(cap: int) -> bool:
    """Whether this process holds ``cap`` in its effective set (/proc/self/status CapEff)."""
    try:
        with open("/proc/self/status") as f:
            eff = next(line.split()[1] for line in f if line.startswith("CapEff:"))
    except (OSError, StopIteration):
        return False
    return bool(int(eff, 16) >> cap & 1)


class Device:
    """An open TUN or TAP device: non-blocking fd, read into / write from buffers."""

    def __init__(self, name: str, kind: DeviceKind, offload: bool = False, multi_queue: bool = False) -> None:
        flags = (IFF_TAP if kind is DeviceKind.TAP else IFF_TUN) | IFF_NO_PI | (IFF_VNET_HDR if offload else 0)
        flags |= IFF_MULTI_QUEUE if multi_queue else 0
        try:
            self._dev = TunTapDevice(name=name, flags=flags)
        except FileNotFoundError as e:
            raise DeviceError("/dev/net/tun is missing: load the 'tun' kernel module (modprobe tun)") from e
        except (PytunError, PermissionError) as e:
            if isinstance(e, PermissionError) and not isinstance(e, PytunError):  # os.open of the node
                raise DeviceError(_node_denied(), missing_privilege=True) from e
            if e.errno in (errno.EPERM, errno.EACCES):
                raise DeviceError(
                    f"creating {kind.value.upper()} device {name!r} needs CAP_NET_ADMIN: run as root or grant "
                    "the capability (systemd: AmbientCapabilities=CAP_NET_ADMIN)",
                    missing_privilege=True,
                ) from e
            if e.errno == errno.EBUSY:
                raise DeviceError(f"device {name!r} is busy: another process has it open") from e
            if e.errno == errno.EINVAL:
                raise DeviceError(f"device {name!r} exists and is not a {kind.value.upper()} device") from e
            raise DeviceError(f"cannot create {kind.value.upper()} device {name!r}: {e.strerror or e}") from e
        self.kind = kind
        self.name = self._dev.name
        self._fd = self._dev.fileno()
        os.set_blocking(self._fd, False)
        self.offloads = self._set_offload() if offload else 0

    def _set_offload(self) -> int:
        """Turn on what the kernel offers, USO last: kernels before 6.2 reject its flags (EINVAL)."""
        for offloads in (OFFLOADS_ALL, OFFLOADS_TCP):
            try:
                fcntl.ioctl(self._fd, TUNSETOFFLOAD, offloads)
                return offloads
            except OSError:
                continue
        return 0

    def fileno(self) -> int:
        return self._fd

    def read_into(self, buf: memoryview) -> int:
        """Read one frame into ``buf``; raises BlockingIOError when there is none."""
        return os.readv(self._fd, (buf,))

    def write(self, frame: memoryview) -> int:
        return os.write(self._fd, frame)

    def writev(self, buffers) -> int:
        """One frame from several buffers (virtio_net_hdr, headers, payloads), written as one."""
        return os.writev(self._fd, buffers)

    def mtu(self) -> int:
        """The interface's MTU as it is now (SIOCGIFMTU; ``ip link set DEV mtu N`` changes it); OSError if it is gone."""
        return self._dev.mtu

    def close(self) -> None:
        self._dev.close()
