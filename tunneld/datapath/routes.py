"""Prefix → peer, WireGuard's AllowedIPs: outbound the inner destination picks the peer by longest-prefix
match; inbound the inner source must match back to the peer that sent it.

A real configuration has a handful of prefix lengths, so the table is one dict per (version, prefix length),
network (an int) → peer, tried from the longest length down: a look-up costs a mask and a dict get per length
present, with no trie to walk in Python. Each prefix has one owner: adding a prefix another peer holds is
refused (ValueError, one line), as two AllowedIPs entries for one prefix would make the outbound choice
ambiguous.

Pure: no I/O; peers are whatever hashable objects the caller uses (the engine's live ``Peer``, or addresses).
"""

from __future__ import annotations

import ipaddress
from typing import Generic, Hashable, TypeVar

P = TypeVar("P", bound=Hashable)

_BITS = {4: 32, 6: 128}


class Routes(Generic[P]):
    def __init__(self) -> None:
        # version → [(prefix length, mask, {network: peer})], longest first
        self._tables: dict[int, list[tuple[int, int, dict[int, P]]]] = {4: [], 6: []}

    def add(self, cidr: str, peer: P) -> None:
        try:
            net = ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise ValueError(f"not a prefix: {cidr!r}") from None
        table = self._table(net.version, net.prefixlen, create=True)
        key = int(net.network_address)
        owner = table.get(key)
        if owner is not None and owner != peer:
            raise ValueError(f"route {net} already belongs to peer {owner}")
        table[key] = peer

    def _table(self, version: int, length: int, create: bool = False) -> dict[int, P]:
        levels = self._tables[version]
        for plen, _mask, table in levels:
            if plen == length:
                return table
        table = {}
        if create:
            bits = _BITS[version]
            mask = ((1 << bits) - 1) ^ ((1 << (bits - length)) - 1)
            levels.append((length, mask, table))
            levels.sort(key=lambda level: -level[0])
        return table

    def remove_peer(self, peer: P) -> int:
        """Drop every prefix ``peer`` owns; how many went."""
        gone = 0
        for version, levels in self._tables.items():
            for _plen, _mask, table in levels:
                keys = [k for k, p in table.items() if p == peer]
                for k in keys:
                    del table[k]
                gone += len(keys)
            self._tables[version] = [level for level in levels if level[2]]
        return gone

    def lookup(self, address: bytes | int, version: int) -> P | None:
        """The peer owning the longest prefix that holds ``address`` (4 or 16 bytes, or an int); None if none."""
        if address.__class__ is not int:
            address = int.from_bytes(address, "big")
        for _plen, mask, table in self._tables[version]:
            peer = table.get(address & mask)
            if peer is not None:
                return peer
        return None

    def prefixes(self, peer: P) -> list[str]:
        """``peer``'s prefixes as text, longest first."""
        out = []
        for version, levels in self._tables.items():
            cls = ipaddress.IPv4Network if version == 4 else ipaddress.IPv6Network
            for plen, _mask, table in levels:
                out.extend(str(cls((k, plen))) for k, p in table.items() if p == peer)
        return out
