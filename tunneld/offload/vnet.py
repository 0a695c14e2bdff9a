"""``struct virtio_net_hdr`` (include/uapi/linux/virtio_net.h): the 10 bytes in front of every read and write
of a TUN/TAP device opened with IFF_VNET_HDR. Fields are in host byte order for TUN/TAP (legacy virtio),
unless TUNSETVNETLE/BE says otherwise, which we never do.

    u8  flags        NEEDS_CSUM: finish the checksum at csum_start + csum_offset; DATA_VALID: already checked
    u8  gso_type     NONE, TCPV4, UDP (UFO, obsolete), TCPV6, UDP_L4 (USO); ECN bit 0x80
    u16 hdr_len      bytes of headers (not to be trusted: recompute from csum_start + the L4 header)
    u16 gso_size     payload bytes per segment
    u16 csum_start   offset of the L4 header
    u16 csum_offset  offset of the checksum field inside it (TCP 16, UDP 6)

A TAP set up for GSO over UDP tunnels (Linux ≥ 6.17: TUN_F_UDP_TUNNEL_GSO, TUNSETVNETHDRSZ 24; see
tunneld/io/egress.py) takes the 24-byte ``virtio_net_hdr_v1_hash_tunnel`` instead (include/uapi/linux/
virtio_net.h): the 10 bytes above, then u16 num_buffers, u32 hash_value, u16 hash_report, u16 padding (all
zero on a write), u16 outer_th_offset (the outer UDP header) and u16 inner_nh_offset (the inner IP header).
gso_type carries the inner type OR'ed with GSO_UDP_TUNNEL_IPV4/IPV6 (the outer IP version), csum_start and
csum_offset name the INNER checksum (virtio_net_hdr_tnl_to_skb: inner_th = csum_start), and the flag
F_UDP_TUNNEL_CSUM asks for an outer UDP checksum per segment. The kernel reads the tunnel offsets as
little-endian and the rest in the device's vnet byte order, which is the host's (we never set TUNSETVNETLE/BE):
one and the same on little-endian hosts; tunneld/io/egress.py refuses the path on a big-endian one.
"""

from __future__ import annotations

import struct

from tunneld.encap.checksum import internet_checksum

VNET_HDR_LEN = 10
HDR = struct.Struct("=BBHHHH")

F_NEEDS_CSUM = 1
F_DATA_VALID = 2
F_UDP_TUNNEL_CSUM = 8  # tunnel header only: the outer UDP checksum is to be computed for each segment

GSO_NONE = 0
GSO_TCPV4 = 1
GSO_UDP = 3
GSO_TCPV6 = 4
GSO_UDP_L4 = 5
GSO_ECN = 0x80
GSO_UDP_TUNNEL_IPV4 = 0x20  # tunnel header only: OR'ed into gso_type, the outer IP version
GSO_UDP_TUNNEL_IPV6 = 0x40

TUNNEL_HDR_LEN = 24
# The 10 bytes, num_buffers, hash_value, hash_report, padding, outer_th_offset, inner_nh_offset. Little-endian
# throughout: the tunnel offsets are, and the rest is host order, the same here (see above).
TUNNEL_HDR = struct.Struct("<BBHHHHHIHHHH")

TCP_CSUM_OFFSET = 16
UDP_CSUM_OFFSET = 6

NO_OFFLOAD = HDR.pack(0, GSO_NONE, 0, 0, 0, 0)  # a plain frame: nothing for the kernel to do
assert TUNNEL_HDR.size == TUNNEL_HDR_LEN


def finish_checksum(frame: memoryview, csum_start: int, csum_offset: int) -> bool:
    """Complete a partial (NEEDS_CSUM) L4 checksum in place. The field already holds the pseudo-header sum, as
    the kernel's CHECKSUM_PARTIAL does; we add everything from ``csum_start`` on and store the complement.
    Returns False when the offsets do not fit the frame (the caller counts and drops it)."""
    at = csum_start + csum_offset
    if at + 2 > len(frame) or csum_start >= len(frame):
        return False
    csum = internet_checksum(frame[csum_start:])
    if csum == 0 and csum_offset == UDP_CSUM_OFFSET:
        csum = 0xFFFF  # UDP sends a computed zero as all ones (RFC 768)
    frame[at] = csum >> 8
    frame[at + 1] = csum & 0xFF
    return True
