"""WireGuard, sans I/O: the protocol core of ``--mode wireguard`` (whitepaper: https://www.wireguard.com/papers/wireguard.pdf;
interoperable with wireguard-go).

The parts, in the order a packet meets them:
  primitives  HASH, MAC, HMAC, KDF1-3, DH, AEAD, XAEAD, TAI64N: thin wrappers over cryptography, hashlib, PyNaCl
  messages    the four messages' sizes and field offsets
  cookie      mac1/mac2 and cookie replies (the DoS defence)
  noise       the Noise_IKpsk2 handshake, one function per message, and the transport keypairs
  replay      the sliding replay window
  peer        a peer's session: keypairs, staged packets, timers; ``seal`` and ``tick``
  device      the static key, peers, index table, load state; ``open`` for every datagram received
  results     what ``open`` returns: Deliver, Reply, Consumed, Drop(reason)

Nothing here opens a socket or reads a clock: the owner passes ``now`` in and does the sending. An owner's loop:

    device = Device(private_key, wall_offset=time.time() - time.monotonic())
    peer = device.add_peer(public_key, preshared_key=psk, endpoint=("192.0.2.1", 51820), persistent_keepalive=25)
    # from the tunnel:  for d in peer.seal(inner, now): sock.sendto(d, peer.endpoint)
    # from the socket:  match device.open(datagram, source, now, out=buffer):
    #                     Deliver: write result.packet (after the allowed-IPs check), send result.send
    #                     Reply: send result.datagrams to result.address (count result.dropped if set)
    #                     Drop: count result.reason
    # on the deadline:  datagrams, deadline = device.tick(now)  (send each to its address)
"""

from tunneld.encap.wireguard.device import Device
from tunneld.encap.wireguard.peer import Peer
from tunneld.encap.wireguard.primitives import StaticKey, key_from_base64, key_to_base64
from tunneld.encap.wireguard.results import Consumed, Deliver, Drop, Reason, Reply

__all__ = ["Consumed", "Deliver", "Device", "Drop", "Peer", "Reason", "Reply", "StaticKey", "key_from_base64",
           "key_to_base64"]
