"""Kernel offloads: moving TCP/UDP super-frames instead of MTU-sized packets.

Theory of operation (VXLAN over a TAP device opened with IFF_VNET_HDR and TUNSETOFFLOAD):

Outbound (device → peer):
  1. one read returns a ``virtio_net_hdr`` (vnet.py) and a frame of up to 64 KiB; with ``gso_type`` TCPV4,
     TCPV6 or UDP_L4 the frame is a super-frame the kernel did not cut into MTU-sized pieces;
  2. segment.py cuts it into equal segments of ``gso_size`` payload bytes (the last may be shorter), each with
     its own copy of the headers: IPv4 length/ID/checksum or IPv6 payload length, TCP sequence numbers and
     flags (FIN/PSH only on the last, CWR only on the first) or UDP length, and the full L4 checksum. Every
     segment gets the VXLAN header in front: the result is one buffer of equal-size VXLAN datagrams;
  3. the link sends that buffer with ONE sendmsg carrying UDP_SEGMENT; the kernel cuts it into datagrams.
  A frame that is not a super-frame but asks for a checksum (NEEDS_CSUM) gets it finished here and takes the
  plain path.

Inbound (peer → device):
  1. the UDP socket has UDP_GRO on: one recvmsg returns up to 64 datagrams of one size back to back, with that
     size in a control message;
  2. coalesce.py checks them all at once: valid VXLAN header, and which neighbours are in-order TCP segments
     of one flow with equal headers, valid checksums and nothing but ACK (PSH may end a run);
  3. each run becomes one super-frame written with a ``virtio_net_hdr`` (GSO, NEEDS_CSUM with the
     pseudo-header sum in the TCP checksum field); everything else is written frame by frame.

The arithmetic is vectorised with NumPy: the payloads are laid out as the rows of a matrix, so a 64 KiB frame
costs a few dozen NumPy calls instead of a Python loop per segment. One's-complement sums are taken over
native (little-endian) 16-bit words, which is the byte-swapped big-endian sum (RFC 1071 §2(B)); a byte swap
of a 16-bit value is a multiplication by 256 modulo 0xFFFF, which is how the two are converted.

These modules are sans-IO: bytes in, bytes (and what to do with them) out.
"""
