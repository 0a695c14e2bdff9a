"""Fuzzing the decoders, the segmenter, the coalescer and the vnet header helper with hypothesis
(properties in tests/fuzz_targets.py).

In ``make test`` the runs are short and derandomized (the same examples every time, so CI is deterministic):
a few seconds in all. ``make fuzz`` sets TUNNELD_FUZZ_EXAMPLES for long, random runs (and runs atheris,
coverage-guided, where it is installed: tests/fuzz_atheris.py).
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import fuzz_targets as F
from tunneld.offload import layout as L

LONG = int(os.environ.get("TUNNELD_FUZZ_EXAMPLES", "0"))
FUZZ = settings(
    max_examples=LONG or 60,
    derandomize=not LONG,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

CODECS = {**F.CODECS, **F.plugin_codecs()}


def test_the_plugin_codec_is_fuzzed_too():
    assert "ipudp" in CODECS  # the example plugin imports from the tree


# -- decap -----------------------------------------------------------------------------------------------------

@st.composite
def near_valid(draw, codec) -> bytes:
    """A packet that starts as the codec's own encapsulation of a random frame, then is damaged: truncated,
    bytes flipped, or extended; most of the header checks are then reached, not only the first."""
    inner = draw(st.binary(min_size=0, max_size=200))
    if draw(st.booleans()):  # a plausible IPv4 or IPv6 packet, so GRE's length check is reached
        inner = draw(st.sampled_from([b"\x45\0", b"\x60\0"])) + inner
    buf = bytearray(64) + bytearray(inner)
    start = codec.encap(buf, 64, len(buf))
    packet = bytearray(buf[start:]) if isinstance(start, int) else bytearray(inner)
    for _ in range(draw(st.integers(0, 3))):
        if packet:
            at = draw(st.integers(0, len(packet) - 1))
            packet[at] ^= draw(st.integers(1, 255))
    cut = draw(st.integers(0, len(packet)))
    return bytes(packet[:cut] if draw(st.booleans()) else packet)


@pytest.mark.parametrize("name", sorted(CODECS))
@FUZZ
@given(data=st.data())
def test_decap_never_raises(name, data):
    codec = CODECS[name]
    packet = data.draw(st.one_of(st.binary(max_size=300), near_valid(codec)))
    F.decap(codec, packet)


# -- segmenter and coalescer -----------------------------------------------------------------------------------

@st.composite
def superframe(draw):
    v6, udp, l2 = draw(st.booleans()), draw(st.booleans()), draw(st.booleans())
    payload = draw(st.binary(min_size=1, max_size=6000))
    gso_size = draw(st.integers(-(-len(payload) // 1000), 1500))  # at most 1000 segments (MAX_SEGMENTS 1024)
    flags = draw(st.sampled_from([L.TCP_ACK, L.TCP_ACK | L.TCP_PSH, L.TCP_ACK | L.TCP_FIN, L.TCP_ACK | L.TCP_CWR]))
    frame = F.tcp_or_udp_frame(v6=v6, udp=udp, l2=l2, payload=payload, flags=flags,
                               seq=draw(st.integers(0, 2**32 - 1)), ip_id=draw(st.integers(0, 0xFFFF)))
    return v6, udp, l2, frame, gso_size, flags


@FUZZ
@given(case=superframe())
def test_split_then_plan_gives_back_every_payload_byte(case):
    v6, udp, l2, frame, gso_size, flags = case
    segmenter, coalescer, p = F.offload_pair(l2)
    rows = F.split(segmenter, frame, F.gso_type_of(v6=v6, udp=udp), gso_size, prefix_len=p, l2=l2)
    assert rows  # a well-formed super-frame is always cut
    items = F.plan(coalescer, b"".join(rows), len(rows[0]), prefix_len=p)
    if len(rows) >= 2 and (udp or flags in (L.TCP_ACK, L.TCP_ACK | L.TCP_PSH)):
        # one flow, in order, nothing but ACK (PSH on the last): the coalescer merges them back into one
        assert [type(i) for i in items] == [F.SuperFrame] and items[0].segments == len(rows)


@FUZZ
@given(case=superframe(), damage=st.lists(st.tuples(st.integers(0, 2**16), st.integers(1, 255)), max_size=4),
       cut=st.integers(0, 64))
def test_plan_accounts_for_every_row_of_a_damaged_batch(case, damage, cut):
    v6, udp, l2, frame, gso_size, _ = case
    segmenter, coalescer, p = F.offload_pair(l2, uso=udp)
    rows = F.split(segmenter, frame, F.gso_type_of(v6=v6, udp=udp), gso_size, prefix_len=p, l2=l2)
    batch = bytearray(b"".join(rows))
    for at, bits in damage:
        batch[at % len(batch)] ^= bits
    F.plan(coalescer, bytes(batch[: max(1, len(batch) - cut)]), len(rows[0]), prefix_len=p)


@FUZZ
@given(l2=st.booleans(), batch=st.binary(min_size=1, max_size=3000), rowlen=st.integers(-1, 400))
def test_plan_never_raises_on_noise(l2, batch, rowlen):
    _, coalescer, p = F.offload_pair(l2)
    F.plan(coalescer, batch, rowlen, prefix_len=p)


@FUZZ
@given(l2=st.booleans(), frame=st.binary(max_size=2000), gso_type=st.integers(0, 255), gso_size=st.integers(0, 70000))
def test_split_never_raises_on_noise(l2, frame, gso_type, gso_size):
    segmenter, _, p = F.offload_pair(l2)
    F.split(segmenter, frame, gso_type, gso_size, prefix_len=p, l2=l2)


@FUZZ
@given(case=superframe(), damage=st.lists(st.tuples(st.integers(0, 200), st.integers(1, 255)), max_size=3),
       gso_type=st.integers(0, 255))
def test_split_never_raises_on_damaged_headers(case, damage, gso_type):
    _, _, l2, frame, gso_size, _ = case
    segmenter, _, p = F.offload_pair(l2)
    frame = bytearray(frame)
    for at, bits in damage:
        frame[at % len(frame)] ^= bits
    F.split(segmenter, bytes(frame), gso_type, gso_size, prefix_len=p, l2=l2)


# -- vnet header ----------------------------------------------------------------------------------------------

@FUZZ
@given(frame=st.binary(max_size=400), csum_start=st.integers(0, 0xFFFF), csum_offset=st.integers(0, 0xFFFF))
def test_finish_checksum_writes_only_its_field_and_completes_the_sum(frame, csum_start, csum_offset):
    F.vnet_finish(frame, csum_start % (len(frame) + 8), csum_offset % 40)
