"""Encapsulation codecs: pure functions and classes over bytes; stdlib only, no I/O."""

from tunneld.encap.base import DeviceKind, Drop, Encapsulator, Transport

__all__ = ["DeviceKind", "Drop", "Encapsulator", "Transport"]
