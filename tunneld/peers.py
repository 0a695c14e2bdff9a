"""Peers as configuration names them: one value per far end, whatever said so (flags, a file, the control
socket, later a registry).

A ``PeerSpec`` is what is *said* about a peer; the data path keeps its live state (counters, when it was last
heard, the FDB entries and routes that point at it) in its own tables, keyed by ``address``. Two specs with
the same address are the same peer: applying a new spec for a known address changes its name, routes or
static MACs and keeps its counters (SIGHUP, ``tunneld peer add`` of a known address).

Pure: no I/O, stdlib only.
"""

from __future__ import annotations

from dataclasses import dataclass

STATIC = "static"  # from the command line, the configuration file or the control socket
REGISTRY = "registry"  # from a membership registry (etcd)


@dataclass(frozen=True)
class PeerSpec:
    """One far end of the overlay.

    ``address``: its underlay IPv4/IPv6 address, canonical (``ipaddress`` text form), the peer's identity.
    ``name``: an operator's label for ``tunneld show``, or None.
    ``routes``: L3 modes (gre, TUN plugins): the inner prefixes reached through this peer, canonical CIDRs;
      inbound packets from it must come from one of them (WireGuard's AllowedIPs).
    ``macs``: L2 modes (vxlan, gretap, TAP plugins): static FDB entries, canonical lower-case ``aa:bb:..``.
    ``source``: who said so, STATIC or REGISTRY (shown by ``tunneld show``).
    """

    address: str
    name: str | None = None
    routes: tuple[str, ...] = ()
    macs: tuple[str, ...] = ()
    source: str = STATIC

    def label(self) -> str:
        """How logs and ``tunneld show`` name it: ``name (address)`` or the address alone."""
        return f"{self.name} ({self.address})" if self.name else self.address
