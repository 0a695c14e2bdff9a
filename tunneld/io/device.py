"""TUN/TAP devices, opened with pytun-pmd3.

The device is created by TUNSETIFF and lives exactly as long as its file descriptor: closing it (or the
process dying, even by SIGKILL) removes the interface. The fd is non-blocking; the engine drains it from the
event loop's reader callback.

``read_into``/``write`` take buffers so the engine can read a frame straight into a preallocated buffer
behind headroom, and write a slice of a received datagram without copying it.
"""

from __future__ import annotations

import errno
import os

from pytun_pmd3.linux import IFF_NO_PI, IFF_TAP, IFF_TUN, PytunError, TunTapDevice

from tunneld.encap.base import DeviceKind


class DeviceError(Exception):
    """The device could not be created; the message is meant for the operator."""


class Device:
    """An open TUN or TAP device: non-blocking fd, read into / write from buffers."""

    def __init__(self, name: str, kind: DeviceKind) -> None:
        flags = (IFF_TAP if kind is DeviceKind.TAP else IFF_TUN) | IFF_NO_PI
        try:
            self._dev = TunTapDevice(name=name, flags=flags)
        except FileNotFoundError as e:
            raise DeviceError("/dev/net/tun is missing: load the 'tun' kernel module (modprobe tun)") from e
        except (PytunError, PermissionError) as e:
            if e.errno in (errno.EPERM, errno.EACCES):
                raise DeviceError(
                    f"creating {kind.value.upper()} device {name!r} needs CAP_NET_ADMIN: run as root or grant "
                    "the capability (systemd: AmbientCapabilities=CAP_NET_ADMIN)"
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

    def fileno(self) -> int:
        return self._fd

    def read_into(self, buf: memoryview) -> int:
        """Read one frame into ``buf``; raises BlockingIOError when there is none."""
        return os.readv(self._fd, (buf,))

    def write(self, frame: memoryview) -> int:
        return os.write(self._fd, frame)

    def close(self) -> None:
        self._dev.close()
