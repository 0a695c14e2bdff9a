"""The kernel's doors: the TUN/TAP device, the underlay sockets, and netlink configuration."""

import ipaddress
import socket


class SetupError(Exception):
    """A door could not be opened; ``str()`` is one line for the operator.

    ``missing_privilege`` is set when the kernel said EPERM/EACCES, i.e. a capability is missing (the
    daemon then exits 77, EX_NOPERM, which tells systemd and scripts it is not worth retrying as is).
    """

    def __init__(self, message: str, *, missing_privilege: bool = False) -> None:
        super().__init__(message)
        self.missing_privilege = missing_privilege


class LinkError(SetupError):
    """The underlay socket could not be set up; the message is meant for the operator."""


def underlay_family(peer: str, local: str | None = None) -> tuple[int, str]:
    """The socket family for an underlay to ``peer`` and the peer's normalised address.

    ``local``, when given, must be of the same IP version. Source addresses of received packets are compared
    with the normalised form, as the kernel reports them.
    """
    peer_ip = ipaddress.ip_address(peer)
    if local is not None and ipaddress.ip_address(local).version != peer_ip.version:
        raise LinkError(f"local address {local} and peer {peer} are not of the same IP version")
    return (socket.AF_INET6 if peer_ip.version == 6 else socket.AF_INET), peer_ip.compressed


def same_family_peer(peer: str, family: int) -> str:
    """``peer`` normalised, for a running link of ``family``: a new peer cannot change the IP version."""
    new_family, normalised = underlay_family(peer)
    if new_family != family:
        raise LinkError(f"new peer {peer} is not of the same IP version as the underlay socket")
    return normalised
