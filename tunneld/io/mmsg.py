"""sendmmsg(2) and recvmmsg(2): many packets per system call on a socket that has no GSO/GRO (raw IP).

Python's ``socket`` module has neither call, so they are reached through ctypes. Everything the kernel reads is
laid out once: an array of ``struct mmsghdr``, one ``struct iovec`` each, and (for receiving) one slot and one
address buffer each. Per call, only the iovec bases and lengths change, and those are written for all messages
at once through a NumPy view of the iovec array; the lengths the kernel returns are read the same way.

Layouts are the C ones of this platform (ctypes computes the padding), from <sys/socket.h> and <sys/uio.h>.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import sys

import numpy as np

from tunneld.io.udp import SO_RXQ_OVFL

MSG_DONTWAIT = 0x40
MSG_TRUNC = 0x20
SCALAR_ROWS = 4  # up to this many messages, iovecs are filled one by one rather than with NumPy

_libc = ctypes.CDLL(None, use_errno=True)


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _Msghdr(ctypes.Structure):
    _fields_ = [
        ("msg_name", ctypes.c_void_p),
        ("msg_namelen", ctypes.c_uint32),
        ("msg_iov", ctypes.POINTER(_Iovec)),
        ("msg_iovlen", ctypes.c_size_t),
        ("msg_control", ctypes.c_void_p),
        ("msg_controllen", ctypes.c_size_t),
        ("msg_flags", ctypes.c_int),
    ]


class _Mmsghdr(ctypes.Structure):
    _fields_ = [("msg_hdr", _Msghdr), ("msg_len", ctypes.c_uint)]


_sendmmsg = _libc.sendmmsg
_sendmmsg.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int)
_sendmmsg.restype = ctypes.c_int
_recvmmsg = _libc.recvmmsg
_recvmmsg.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_void_p)
_recvmmsg.restype = ctypes.c_int

_MSG_SIZE = ctypes.sizeof(_Mmsghdr)
_NAMELEN_AT = _Mmsghdr.msg_hdr.offset + _Msghdr.msg_namelen.offset
_CONTROLLEN_AT = _Mmsghdr.msg_hdr.offset + _Msghdr.msg_controllen.offset
_MSGLEN_AT = _Mmsghdr.msg_len.offset
_FLAGS_AT = _Mmsghdr.msg_hdr.offset + _Msghdr.msg_flags.offset
assert ctypes.sizeof(_Iovec) == 16 and not (_NAMELEN_AT % 4 or _MSGLEN_AT % 4 or _FLAGS_AT % 4)


def _u32_column(msgs, at: int, count: int) -> np.ndarray:
    """A writable uint32 view of the field at byte ``at`` of every mmsghdr."""
    raw = np.frombuffer(msgs, np.uint8)
    return np.ndarray((count,), np.uint32, raw, at, (_MSG_SIZE,))


def _u64_column(msgs, at: int, count: int) -> np.ndarray:
    """A writable uint64 view of the (size_t) field at byte ``at`` of every mmsghdr."""
    raw = np.frombuffer(msgs, np.uint8)
    return np.ndarray((count,), np.uint64, raw, at, (_MSG_SIZE,))


# One control message per packet: SO_RXQ_OVFL's u32, behind a struct cmsghdr (size_t len, int level, int type).
_CMSG_LEVEL_AT = ctypes.sizeof(ctypes.c_size_t)
_CMSG_DATA_AT = _CMSG_LEVEL_AT + 8
CONTROL_SIZE = 32  # CMSG_SPACE(4) is 24 on 64-bit Linux; room to spare


def _address(buffer) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))


class MessageSender:
    """Sends rows of one buffer (``rowlen`` bytes each, the last maybe shorter) as separate packets to one
    address, up to ``capacity`` per system call."""

    def __init__(self, fd: int, capacity: int = 128) -> None:
        self._fd = fd
        self.capacity = capacity
        self._iov = np.zeros((capacity, 2), np.uint64)  # struct iovec: base, len
        self._iovs = (_Iovec * capacity).from_address(self._iov.ctypes.data)  # the same memory, for one or two
        self._msgs = (_Mmsghdr * capacity)()
        self._name = ctypes.create_string_buffer(28)  # sockaddr_in or sockaddr_in6
        self._current: bytes | None = None  # the destination the name holds
        self._namelen = 0
        iov_at = self._iov.ctypes.data
        for i, m in enumerate(self._msgs):
            m.msg_hdr.msg_name = ctypes.addressof(self._name)
            m.msg_hdr.msg_iov = ctypes.cast(iov_at + 16 * i, ctypes.POINTER(_Iovec))
            m.msg_hdr.msg_iovlen = 1
        self._msgs_at = ctypes.addressof(self._msgs)
        self._steps = np.arange(capacity, dtype=np.uint64)

    def set_destination(self, sockaddr: bytes) -> None:
        ctypes.memmove(self._name, sockaddr, len(sockaddr))
        self._current = sockaddr
        if len(sockaddr) != self._namelen:  # one family per socket: set once
            self._namelen = len(sockaddr)
            for m in self._msgs:
                m.msg_hdr.msg_namelen = len(sockaddr)

    def send(self, buffer, rowlen: int, sockaddr: bytes | None = None) -> int:
        """Send every row of ``buffer`` (a writable buffer) to ``sockaddr`` (None: the last destination set);
        returns how many left. Raises OSError (its ``sent`` attribute: the packets that left before the
        failure) when the kernel refuses one."""
        if sockaddr is not None and sockaddr is not self._current:
            self.set_destination(sockaddr)
        total = len(buffer)
        count = -(-total // rowlen)
        base = _address(buffer)
        sent = 0
        while sent < count:
            n = min(count - sent, self.capacity)
            if n <= SCALAR_ROWS:  # a ping, an ACK: a few attribute stores cost less than NumPy's calls
                for i in range(n):
                    v = self._iovs[i]
                    v.iov_base = base + (sent + i) * rowlen
                    v.iov_len = rowlen
            else:
                iov = self._iov
                iov[:n, 0] = self._steps[:n] * rowlen + (base + sent * rowlen)
                iov[:n, 1] = rowlen
            if sent + n == count:
                self._iovs[n - 1].iov_len = total - (count - 1) * rowlen
            done = _sendmmsg(self._fd, self._msgs_at, n, 0)
            if done < 0:
                code = ctypes.get_errno()
                error = OSError(code, os.strerror(code))
                error.sent = sent
                raise error
            sent += done  # fewer than asked: the next call sends the rest, or reports the error that stopped it
        return sent


class MessageReceiver:
    """Receives up to ``slots`` packets per system call, each into its own ``slot_size``-byte row of
    ``self.slots``, with its source address in the same row of ``self.names``; ``overflow(i)`` is the socket's
    drop count the i-th packet carried (SO_RXQ_OVFL, once the socket asked for it and has dropped any)."""

    NAME_SIZE = 28  # sockaddr_in6, the larger of the two

    def __init__(self, fd: int, slots: int = 64, slot_size: int = 1 << 16) -> None:
        self._fd = fd
        self.capacity = slots
        self.slots = np.zeros((slots, slot_size), np.uint8)  # calloc'd: pages cost memory only once touched
        self.names = np.zeros((slots, self.NAME_SIZE), np.uint8)
        self._iov = np.zeros((slots, 2), np.uint64)
        self._iov[:, 0] = self.slots.ctypes.data + np.arange(slots, dtype=np.uint64) * slot_size
        self._iov[:, 1] = slot_size
        self._msgs = (_Mmsghdr * slots)()
        self.controls = np.zeros((slots, CONTROL_SIZE), np.uint8)
        iov_at, names_at, controls_at = self._iov.ctypes.data, self.names.ctypes.data, self.controls.ctypes.data
        for i, m in enumerate(self._msgs):
            m.msg_hdr.msg_name = names_at + self.NAME_SIZE * i
            m.msg_hdr.msg_iov = ctypes.cast(iov_at + 16 * i, ctypes.POINTER(_Iovec))
            m.msg_hdr.msg_iovlen = 1
            m.msg_hdr.msg_control = controls_at + CONTROL_SIZE * i
            m.msg_hdr.msg_controllen = CONTROL_SIZE
        self._msgs_at = ctypes.addressof(self._msgs)
        self._namelen = _u32_column(self._msgs, _NAMELEN_AT, slots)
        self.lengths = _u32_column(self._msgs, _MSGLEN_AT, slots)
        self._flags = _u32_column(self._msgs, _FLAGS_AT, slots)
        self._namelen[:] = self.NAME_SIZE
        self._controllen = _u64_column(self._msgs, _CONTROLLEN_AT, slots)
        self._returned = 0  # messages whose address and control lengths the last call overwrote

    def receive(self) -> int:
        """How many packets arrived (at least one): ``slots[i, :lengths[i]]`` from ``names[i]``. Raises
        BlockingIOError when none is waiting, OSError for an error the socket reports."""
        if self._returned == 1:
            hdr = self._msgs[0].msg_hdr
            hdr.msg_namelen = self.NAME_SIZE
            hdr.msg_controllen = CONTROL_SIZE
        elif self._returned:
            self._namelen[: self._returned] = self.NAME_SIZE  # the kernel wrote back each address's length
            self._controllen[: self._returned] = CONTROL_SIZE  # and each control message's
        n = _recvmmsg(self._fd, self._msgs_at, self.capacity, MSG_DONTWAIT, None)
        if n < 0:
            code = ctypes.get_errno()
            if code in (errno.EAGAIN, errno.EWOULDBLOCK):
                raise BlockingIOError(code, os.strerror(code))
            raise OSError(code, os.strerror(code))
        self._returned = n
        return n

    def overflow(self, i: int) -> int | None:
        """The drop count packet ``i`` of the last call carried, or None (none: the socket has dropped nothing,
        or does not ask). The last packet's is the latest."""
        hdr = self._msgs[i].msg_hdr
        if hdr.msg_controllen < _CMSG_DATA_AT + 4:
            return None
        row = self.controls[i]
        if (int.from_bytes(row[_CMSG_LEVEL_AT : _CMSG_LEVEL_AT + 4], sys.byteorder) != socket.SOL_SOCKET
                or int.from_bytes(row[_CMSG_LEVEL_AT + 4 : _CMSG_DATA_AT], sys.byteorder) != SO_RXQ_OVFL):
            return None
        return int.from_bytes(row[_CMSG_DATA_AT : _CMSG_DATA_AT + 4], sys.byteorder)

    def first_length(self) -> int:
        """``lengths[0]`` without a NumPy call: a lone packet (the sparse case) is read field by field."""
        return self._msgs[0].msg_len

    def first_truncated(self) -> bool:
        return bool(self._msgs[0].msg_hdr.msg_flags & MSG_TRUNC)

    def any_truncated(self, count: int) -> bool:
        return bool((self._flags[:count] & MSG_TRUNC).any())

    def truncated(self, count: int) -> list[bool]:
        """Which of the last ``count`` packets were longer than their slot (the kernel cut them: MSG_TRUNC)."""
        return ((self._flags[:count] & MSG_TRUNC) != 0).tolist()
