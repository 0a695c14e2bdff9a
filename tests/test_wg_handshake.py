"""WireGuard's primitives and handshake, checked against things that are not our code: known constants (boringtun's
precomputed initial chaining key and hash), cryptography's own HKDF, an independent Noise implementation
(``noiseprotocol``, used as an oracle only) in both roles, and scapy's WireGuard dissector for the wire layout.
mac1 is always computed here with hashlib from the whitepaper's definition, never with the code under test."""

from __future__ import annotations

import hashlib
import struct

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from tunneld.encap.wireguard import Consumed, Deliver, Device, Drop, Reason, Reply, StaticKey
from tunneld.encap.wireguard import messages as m
from tunneld.encap.wireguard.noise import INITIAL_CHAIN_KEY, INITIAL_HASH
from tunneld.encap.wireguard.primitives import KDF1, KDF2, KDF3, TAI64N, key_from_base64, key_to_base64

noise_connection = pytest.importorskip("noise.connection")

WALL = 1_780_000_000.25  # a wall clock for the TAI64N timestamps
NOW = 1000.0
A_ADDR = ("10.9.0.1", 40001)
B_ADDR = ("10.9.0.2", 51820)
PING = bytes.fromhex("45000054f00d40004001cafe0a4e00010a4e0002") + bytes(64)  # 84-byte IPv4 header + payload


def mac(key: bytes, data: bytes) -> bytes:
    return hashlib.blake2s(data, key=key, digest_size=16).digest()


def mac1_for(receiver_public: bytes, msg: bytes, offset: int) -> bytes:
    """The whitepaper's mac1, written out here: MAC(HASH(LABEL_MAC1 || Spub_receiver), msg up to mac1)."""
    return mac(hashlib.blake2s(b"mac1----" + receiver_public).digest(), msg[:offset])


def raw_private(key: X25519PrivateKey) -> bytes:
    return key.private_bytes_raw()


def oracle(role: str, private: bytes, remote_public: bytes | None, psk: bytes | None):
    conn = noise_connection.NoiseConnection.from_name(b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s")
    conn.set_as_initiator() if role == "initiator" else conn.set_as_responder()
    conn.set_prologue(b"WireGuard v1 zx2c4 Jason@zx2c4.com")
    conn.set_keypair_from_private_bytes(noise_connection.Keypair.STATIC, private)
    if remote_public is not None:
        conn.set_keypair_from_public_bytes(noise_connection.Keypair.REMOTE_STATIC, remote_public)
    conn.set_psks(psk or bytes(32))
    conn.start_handshake()
    return conn


# -- primitives --------------------------------------------------------------------------------------------------


def test_initial_chaining_key_and_hash_match_the_published_constants():
    # boringtun's noise/handshake.rs precomputes HASH(CONSTRUCTION) and HASH(Ci || IDENTIFIER) as these bytes
    assert list(INITIAL_CHAIN_KEY) == [96, 226, 109, 174, 243, 39, 239, 192, 46, 195, 53, 226, 160, 37, 210, 208,
                                       22, 235, 66, 6, 248, 114, 119, 245, 45, 56, 209, 152, 139, 120, 205, 54]
    assert list(INITIAL_HASH) == [34, 17, 179, 97, 8, 26, 197, 102, 105, 18, 67, 219, 69, 138, 213, 50,
                                  45, 156, 108, 102, 34, 147, 232, 183, 14, 225, 156, 101, 186, 7, 158, 243]


@pytest.mark.parametrize("data", [b"", b"\x01", bytes(32), bytes(range(200))])
def test_kdf_is_hkdf_with_blake2s(data):
    key = hashlib.blake2s(b"some chaining key").digest()
    expected = HKDF(algorithm=hashes.BLAKE2s(32), length=96, salt=key, info=b"").derive(data)
    assert KDF1(key, data) == expected[:32]
    assert b"".join(KDF2(key, data)) == expected[:64]
    assert b"".join(KDF3(key, data)) == expected


def test_tai64n_layout_and_whitening():
    assert TAI64N(0.0) == bytes.fromhex("400000000000000a00000000")
    stamp = TAI64N(1_600_000_000.9995)  # a float: microsecond precision at this magnitude
    seconds, nanos = struct.unpack(">QI", stamp)
    assert seconds == (1 << 62) + 10 + 1_600_000_000
    assert nanos % (1 << 24) == 0 and 999_500_000 - (1 << 24) < nanos <= 999_500_000


def test_timestamps_always_increase_even_within_the_whitening_and_across_a_restart():
    device = Device(StaticKey.generate(), wall_offset=WALL)
    stamps = [device._timestamp(NOW + i * 0.001) for i in range(20)]  # all inside one 16.8 ms bucket
    assert all(a < b for a, b in zip(stamps, stamps[1:]))
    # a later process: its monotonic clock starts again near 0, the wall clock went on (a minute later)
    restarted = Device(StaticKey.generate(), wall_offset=WALL + NOW + 60)
    assert restarted._timestamp(0.0) > stamps[-1]


def test_keys_in_base64_as_wg_prints_them():
    key = StaticKey.generate()
    assert key_from_base64(key_to_base64(key.public)) == key.public
    for bad in ("", "abc", key_to_base64(key.public)[:-4], "!" * 44):
        with pytest.raises(ValueError) as info:
            key_from_base64(bad)
        assert bad not in str(info.value) or not bad


# -- the handshake against an independent Noise implementation --------------------------------------------------


@pytest.mark.parametrize("psk", [None, bytes(range(32))], ids=["no-psk", "psk"])
def test_our_initiator_against_the_oracle_responder(psk):
    ours, theirs = StaticKey.generate(), X25519PrivateKey.generate()
    their_public = theirs.public_key().public_bytes_raw()
    device = Device(ours, wall_offset=WALL)
    peer = device.add_peer(their_public, preshared_key=psk, endpoint=B_ADDR)
    [initiation] = peer.seal(PING, NOW)

    assert len(initiation) == m.MESSAGE_INITIATION_SIZE == 148
    assert initiation[:4] == b"\x01\x00\x00\x00"
    assert initiation[m.INITIATION_MAC1_OFFSET:m.INITIATION_MAC2_OFFSET] == mac1_for(their_public, initiation, 116)
    assert initiation[m.INITIATION_MAC2_OFFSET:] == bytes(16)  # no cookie yet
    responder = oracle("responder", raw_private(theirs), None, psk)
    timestamp = responder.read_message(initiation[m.INITIATION_EPHEMERAL_OFFSET:m.INITIATION_MAC1_OFFSET])
    assert bytes(timestamp) == device._last_timestamp and bytes(timestamp)[:8] == TAI64N(WALL + NOW)[:8]
    assert responder.noise_protocol.handshake_state.rs.public_bytes == ours.public  # it learnt who we are

    body = responder.write_message(b"")  # e (32) || empty (16)
    our_index = struct.unpack_from("<I", initiation, m.INITIATION_SENDER_OFFSET)[0]
    response = bytearray(struct.pack("<III", 2, 0x1234_5678, our_index) + bytes(body) + bytes(32))
    response[60:76] = mac1_for(ours.public, bytes(response), 60)
    result = device.open(bytes(response), B_ADDR, NOW + 0.01)
    assert isinstance(result, Reply) and result.address == B_ADDR and peer.has_session
    [sealed] = result.datagrams  # the staged ping, which also confirms the session (no extra keepalive)
    assert struct.unpack_from("<IIQ", sealed) == (4, 0x1234_5678, 0)
    assert len(sealed) == 16 + 96 + 16  # 84 bytes padded to 96
    assert bytes(responder.decrypt(sealed[16:])) == PING + bytes(12)

    answer = responder.encrypt(PING[::-1][:0] + PING)  # counter 0 in their direction
    transport = struct.pack("<IIQ", 4, our_index, 0) + bytes(answer)
    delivered = device.open(transport, B_ADDR, NOW + 0.02)
    assert isinstance(delivered, Deliver) and bytes(delivered.packet) == PING and delivered.peer is peer


@pytest.mark.parametrize("psk", [None, bytes(range(100, 132))], ids=["no-psk", "psk"])
def test_the_oracle_initiator_against_our_responder(psk):
    ours, theirs = StaticKey.generate(), X25519PrivateKey.generate()
    their_public = theirs.public_key().public_bytes_raw()
    device = Device(ours, wall_offset=WALL)
    peer = device.add_peer(their_public, preshared_key=psk)
    initiator = oracle("initiator", raw_private(theirs), ours.public, psk)
    body = initiator.write_message(TAI64N(WALL))
    initiation = bytearray(struct.pack("<II", 1, 0xCAFE) + bytes(body) + bytes(32))
    assert len(initiation) == 148
    initiation[116:132] = mac1_for(ours.public, bytes(initiation), 116)

    reply = device.open(bytes(initiation), A_ADDR, NOW)
    assert isinstance(reply, Reply) and reply.peer is peer and reply.address == A_ADDR and peer.endpoint == A_ADDR
    [response] = reply.datagrams
    assert len(response) == 92 and response[:4] == b"\x02\x00\x00\x00"
    assert struct.unpack_from("<I", response, m.RESPONSE_RECEIVER_OFFSET)[0] == 0xCAFE
    assert response[60:76] == mac1_for(their_public, response, 60)
    assert bytes(initiator.read_message(response[m.RESPONSE_EPHEMERAL_OFFSET:m.RESPONSE_MAC1_OFFSET])) == b""
    assert initiator.handshake_finished

    # the responder holds its session until the initiator's first transport message confirms it
    assert not peer.has_session
    assert all(d[0] != 4 for d in peer.seal(PING, NOW + 0.01))
    our_index = struct.unpack_from("<I", response, m.RESPONSE_SENDER_OFFSET)[0]
    transport = struct.pack("<IIQ", 4, our_index, 0) + bytes(initiator.encrypt(PING))
    delivered = device.open(transport, A_ADDR, NOW + 0.02)
    assert isinstance(delivered, Deliver) and bytes(delivered.packet) == PING and peer.has_session
    [released] = delivered.send  # the packet staged before the confirmation
    assert struct.unpack_from("<IIQ", released) == (4, 0xCAFE, 0)
    assert bytes(initiator.decrypt(released[16:]))[:84] == PING


def test_an_initiation_from_an_unknown_key_gets_silence():
    device = Device(StaticKey.generate(), wall_offset=WALL)
    device.add_peer(StaticKey.generate().public)
    stranger = X25519PrivateKey.generate()
    initiator = oracle("initiator", raw_private(stranger), device.public_key, None)
    initiation = bytearray(struct.pack("<II", 1, 7) + bytes(initiator.write_message(TAI64N(WALL))) + bytes(32))
    initiation[116:132] = mac1_for(device.public_key, bytes(initiation), 116)
    assert device.open(bytes(initiation), A_ADDR, NOW) == Drop(Reason.UNKNOWN_PEER)


def test_a_replayed_initiation_is_refused_and_leaves_the_session_alone():
    a, b = Device(StaticKey.generate(), wall_offset=WALL), Device(StaticKey.generate(), wall_offset=WALL)
    pa, pb = a.add_peer(b.public_key, endpoint=B_ADDR), b.add_peer(a.public_key)
    [initiation] = pa.seal(PING, NOW)
    assert isinstance(b.open(initiation, A_ADDR, NOW), Reply)
    assert b.open(initiation, ("10.9.9.9", 1), NOW + 1) == Drop(Reason.REPLAYED)
    assert pb.endpoint == A_ADDR  # a replay from elsewhere moves nothing


# -- the wire layout, read by scapy ---------------------------------------------------------------------------


def test_scapy_reads_our_messages_with_the_right_fields():
    wg = pytest.importorskip("scapy.contrib.wireguard")
    a, b = Device(StaticKey.generate(), wall_offset=WALL), Device(StaticKey.generate(), wall_offset=WALL)
    pa, pb = a.add_peer(b.public_key, endpoint=B_ADDR), b.add_peer(a.public_key)
    [initiation] = pa.seal(PING, NOW)
    p = wg.Wireguard(initiation)
    assert p.message_type == 1 and p.reserved_zero == 0
    i = p[wg.WireguardInitiation]
    assert i.sender_index == pa.handshake.local_index
    assert len(i.unencrypted_ephemeral) == 32 and len(i.encrypted_static) == 48 and len(i.encrypted_timestamp) == 28
    assert i.mac1 == mac1_for(b.public_key, initiation, 116) and i.mac2 == bytes(16)

    reply = b.open(initiation, A_ADDR, NOW)
    [response] = reply.datagrams
    r = wg.Wireguard(response)[wg.WireguardResponse]
    assert r.receiver_index == i.sender_index and r.sender_index == pb.next.local_index
    assert len(r.encrypted_nothing) == 16 and r.mac1 == mac1_for(a.public_key, response, 60)

    [sealed] = a.open(response, B_ADDR, NOW).datagrams
    t = wg.Wireguard(sealed)[wg.WireguardTransport]
    assert t.receiver_index == pb.next.local_index and t.counter == 0
    assert len(t.encrypted_encapsulated_packet) == 96 + 16

    b.force_under_load = True
    cookie = b.open(pa._send_handshake_initiation(NOW + 12, retry=False)[0], A_ADDR, NOW + 12)
    assert cookie.dropped is Reason.COOKIE_REQUIRED
    [cookie_reply] = cookie.datagrams
    c = wg.Wireguard(cookie_reply)
    assert c.message_type == 3 and len(cookie_reply) == 64
    assert c[wg.WireguardCookieReply].receiver_index == pa.handshake.local_index
    assert len(c[wg.WireguardCookieReply].nonce) == 24
    assert isinstance(a.open(cookie_reply, B_ADDR, NOW + 12), Consumed) and pa.cookie.has_cookie


def test_keys_appear_in_no_repr():
    key, psk = StaticKey.generate(), bytes(range(7, 39))
    device = Device(key, wall_offset=WALL)
    other = Device(StaticKey.generate(), wall_offset=WALL)
    peer = device.add_peer(other.public_key, preshared_key=psk, endpoint=B_ADDR)
    other_peer = other.add_peer(key.public, preshared_key=psk)
    [initiation] = peer.seal(PING, NOW)
    device.open(other.open(initiation, A_ADDR, NOW).datagrams[0], B_ADDR, NOW)
    secrets_ = [key.private_bytes(), psk]
    texts = [repr(x) + str(x) for x in (key, device, peer, peer.keys, peer.handshake, peer.current, peer.cookie,
                                        device.cookie_checker, other_peer.next)]
    for secret in secrets_:
        for form in (secret.hex(), key_to_base64(secret), repr(secret)):
            assert not any(form in text for text in texts)
