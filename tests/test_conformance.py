"""The plugin conformance suite: the built-in modes pass it, and codecs that break the contract fail it."""

from __future__ import annotations

import struct
from typing import ClassVar

import pytest

from tunneld.encap.base import DeviceKind, Drop, Encapsulator, Transport
from tunneld.encap.gre import Gre, GreTap
from tunneld.encap.vxlan import Vxlan
from tunneld.testing import (
    CHECKS,
    ConformanceError,
    EncapsulatorConformance,
    check_declaration,
    check_encapsulator,
    check_malformed,
    check_round_trip,
    check_through_engine,
)

ALL_GRE = {"key": "0xdeadbeef", "seq": "yes", "csum": "yes"}


class TestVxlanConforms(EncapsulatorConformance):
    encapsulator = Vxlan


class TestGreConforms(EncapsulatorConformance):
    encapsulator = Gre


class TestGreAllOptionsConforms(EncapsulatorConformance):
    encapsulator = Gre
    options = ALL_GRE


class TestGreTapConforms(EncapsulatorConformance):
    encapsulator = GreTap
    options = ALL_GRE


# -- codecs that break the contract, one rule each -----------------------------------------------------------


class Good(Encapsulator):
    """A 4-byte header "TEST" in front of the frame; the baseline the broken ones below start from."""

    name: ClassVar[str] = "good"
    description: ClassVar[str] = "test codec"
    device: ClassVar[DeviceKind] = DeviceKind.TUN
    transport: ClassVar[Transport] = Transport("udp", 9999)
    header_room: ClassVar[int] = 4
    MAGIC = b"TEST"

    @classmethod
    def from_options(cls, options):
        return cls()

    @property
    def header_len(self) -> int:
        return 4

    def encap(self, buf, start, end):
        buf[start - 4 : start] = self.MAGIC
        return start - 4

    def decap(self, packet):
        if len(packet) < 4 or packet[:4] != self.MAGIC:
            return Drop.BAD_FLAGS
        return 4


class WritesPastHeadroom(Good):
    name = "past"

    def encap(self, buf, start, end):
        buf[start - 6 : start] = b"XX" + self.MAGIC
        return start - 4


class ChangesPayload(Good):
    name = "mangles"

    def encap(self, buf, start, end):
        buf[start] ^= 0xFF
        return super().encap(buf, start, end)

    def decap(self, packet):
        return super().decap(packet)


class RaisesOnShortInput(Good):
    name = "raises"

    def decap(self, packet):
        (word,) = struct.unpack_from("!I", packet)  # struct.error below 4 bytes
        return 4 if word == int.from_bytes(self.MAGIC, "big") else Drop.BAD_FLAGS


class OffsetPastEnd(Good):
    name = "pastend"

    def decap(self, packet):
        return len(packet) + 1


class UnderstatesRoom(Good):
    name = "room"
    header_room = 2


class Lossy(Good):
    name = "lossy"

    def decap(self, packet):
        verdict = super().decap(packet)
        return Drop.TRUNCATED if len(packet) > 1000 else verdict


class NotAnEncapsulator:
    name = "nope"


def test_the_baseline_passes():
    check_encapsulator(Good)


@pytest.mark.parametrize(
    "cls,check,words",
    [
        (WritesPastHeadroom, check_round_trip, "outside"),
        (ChangesPayload, check_round_trip, "changed the frame"),
        (RaisesOnShortInput, check_malformed, "decap raised"),
        (OffsetPastEnd, check_malformed, "neither a Drop nor an offset"),
        (UnderstatesRoom, check_declaration, "header_room"),
        (Lossy, check_round_trip, "dropped on decap"),
        (Lossy, check_through_engine, "dropped well-formed"),
        (NotAnEncapsulator, check_declaration, "not a subclass"),
    ],
)
def test_a_broken_codec_is_caught_with_a_reason(cls, check, words):
    with pytest.raises(ConformanceError, match=words):
        check(cls)


def test_undeclared_option_is_caught():
    with pytest.raises(ConformanceError, match="not declared"):
        check_declaration(Gre, {"colour": "blue"})


def test_the_class_suite_runs_every_check():
    methods = [m for m in dir(EncapsulatorConformance) if m.startswith("test_")]
    assert len(methods) == len(CHECKS)


# -- the codec's verdict on every path (issue 11) -------------------------------------------------------------

from tunneld.datapath.engine import Engine, offload_supported  # noqa: E402
from tunneld.io.port import VnetPort  # noqa: E402
from tunneld.testing import check_verdicts_under_load, engine_pair, paths, refusing  # noqa: E402


class BypassingPort(VnetPort):
    """The offload path as it was before issue 11: coalesced rows went to the device without the codec."""

    def write_rows(self, rx, view, n, size, verdicts, drops):
        return self._write_run(rx, view, 0, n, size, drops)


def bypassing_engine(*args, **kwargs) -> Engine:
    engine = Engine(*args, **kwargs)
    if kwargs.get("offload"):
        engine.port.__class__ = BypassingPort
    return engine


@pytest.mark.parametrize("cls", [Vxlan, Gre, GreTap])
def test_every_builtin_codec_takes_both_paths(cls):
    assert paths(cls) == (False, True)
    assert paths(Gre, {"seq": "yes"}) == (False,)  # a counter in the header: no constant header, batches of one


@pytest.mark.parametrize("cls", [Vxlan, Gre, GreTap])
def test_a_refusing_codec_is_honoured_under_load_on_both_paths(cls):
    check_verdicts_under_load(cls)


@pytest.mark.parametrize("cls", [Vxlan, Gre, GreTap])
def test_the_kit_catches_an_engine_that_lets_coalesced_rows_past_the_codec(cls):
    with pytest.raises(ConformanceError, match="offload path.*not honoured"):
        check_verdicts_under_load(cls, make=bypassing_engine)


def test_the_refusing_variant_refuses_and_keeps_the_fast_verdict_out_of_its_way():
    codec = refusing(Vxlan)(vni=1)
    assert type(codec).decap_batch is Encapsulator.decap_batch  # VXLAN's vectorised verdict would overrule decap
    assert codec.constant_header(4) == Vxlan(vni=1).constant_header(4)  # encap unchanged: the fast path stays
    a, b = engine_pair(refusing(Vxlan), None, offload=True)
    assert offload_supported(a.codec)


class LiesAboutItsHeader(Good):
    """Declares a constant header, then lays another before long frames."""

    name = "liar"

    def constant_header(self, ip_version):
        return self.MAGIC

    def encap(self, buf, start, end):
        at = super().encap(buf, start, end)
        if end - start > 500:
            buf[at] = ord("X")
        return at

    def decap(self, packet):
        return 4 if len(packet) >= 4 else Drop.TRUNCATED


def test_a_false_constant_header_declaration_is_caught():
    with pytest.raises(ConformanceError, match="constant_header"):
        check_round_trip(LiesAboutItsHeader)


# -- the session contract (issue 20): stateful codecs, trailers, own packets and timers ----------------------

from tests.keyed import Keyed, KeyedSession  # noqa: E402
from tunneld.encap.session import HELD  # noqa: E402
from tunneld.testing import END_A, END_B, RefusingSession, check_own_packets  # noqa: E402

KEYED = {"secret": "conformance"}
KEYED_ENDS = {END_A: {"self": END_A}, END_B: {"self": END_B}}


class TestKeyedConforms(EncapsulatorConformance):
    encapsulator = Keyed
    options = KEYED
    ends = KEYED_ENDS


class TestGreSeqCsumConforms(EncapsulatorConformance):
    encapsulator = Gre
    options = {"seq": True, "csum": True}


class TestGreTapSeqConforms(EncapsulatorConformance):
    encapsulator = GreTap
    options = {"seq": True}


def keyed_variant(name: str, session_cls: type[KeyedSession], **attrs) -> type[Keyed]:
    """Keyed with another session class (and class attributes): one broken rule each."""
    return type(name, (Keyed,), {"session": lambda self, peer_id: (Keyed.session(self, peer_id),
                                                                    session_cls(self, peer_id))[1], **attrs})


class WritesPastItsTrailer(KeyedSession):
    __slots__ = ()

    def seal(self, buf, start, end, now):
        sealed = super().seal(buf, start, end, now)
        buf[sealed[1]] = 0  # one byte past the end it returns
        return sealed


class NeverQuiet(KeyedSession):
    __slots__ = ()

    def deadline(self):
        return self._codec.keepalive  # long past: the engine would wake every TIMER_GRAIN

    def poll(self, now):
        return []


class Eager(KeyedSession):
    __slots__ = ()

    def poll(self, now):
        self.last_sent = -float("inf")  # sends whenever asked, whatever its deadline said
        return super().poll(now)


class TrustsAnything(KeyedSession):
    __slots__ = ()

    def open(self, packet, now):
        verdict = super().open(packet, now)
        return verdict if verdict is HELD or verdict.__class__ is tuple else (28, max(0, len(packet) - 44))


class MovedByWhatItRefuses(KeyedSession):
    __slots__ = ()

    def open(self, packet, now):
        verdict = super().open(packet, now)
        if verdict.__class__ is Drop and len(packet) >= 28:  # the counter taken before the tag was checked
            self.rx_counter = max(self.rx_counter or 0, int.from_bytes(packet[20:28], "big"))
        return verdict


class ForgetsWhatItSaw(KeyedSession):
    __slots__ = ()

    def open(self, packet, now):
        self.rx_counter = None  # no replay protection
        return super().open(packet, now)


class PadsPastItsLimit(KeyedSession):
    """Declares that its padding stays within the frame limit, and pads exactly the frames at the limit."""

    __slots__ = ("limit",)

    def set_frame_limit(self, limit):
        self.limit = limit

    def seal(self, buf, start, end, now):
        at_limit = end - start == getattr(self, "limit", None)
        start, stop = super().seal(buf, start, end, now)
        if at_limit:
            buf[stop : stop + 15] = bytes(15)
            stop += 15
        return start, stop


class SharesOneSession(Keyed):
    def session(self, peer_id):
        shared = self.__dict__.setdefault("_one", KeyedSession(self, peer_id))
        return shared


class KeyedWithoutSessions(Good):
    name = "keyless"
    keyed = True


def test_a_codec_whose_padding_stays_within_the_limit_passes_and_counts_no_padding_in_its_overhead():
    honest = keyed_variant("honest_padding", KeyedSession, pads_within_limit=True, align=16, tail_room=31,
                       trailer_len=16)
    check_round_trip(honest, KEYED, ends=KEYED_ENDS, count=50)
    codec = honest.from_options({**KEYED, "self": END_A})
    assert codec.outer_overhead(False) == 20 + 8 + codec.header_len + codec.trailer_len


def test_a_keyed_codec_without_sessions_is_caught():
    with pytest.raises(ConformanceError, match="peer_key would never be asked"):
        check_declaration(KeyedWithoutSessions)


@pytest.mark.parametrize(
    "cls,check,words",
    [
        (keyed_variant("past_trailer", WritesPastItsTrailer), check_round_trip, "outside"),
        (keyed_variant("never_quiet", NeverQuiet), check_own_packets, "still due"),
        (keyed_variant("eager", Eager), check_own_packets, "before the session's deadline"),
        (keyed_variant("trusting", TrustsAnything), check_malformed, "authenticating session accepted"),
        (keyed_variant("moved", MovedByWhatItRefuses), check_malformed, "what it refused moved its state"),
        (keyed_variant("replayable", ForgetsWhatItSaw), check_malformed, "replayed"),
        (SharesOneSession, check_declaration, "one session"),
        (keyed_variant("big_trailer", KeyedSession, tail_room=8), check_round_trip, "trailer_len 8"),
        (keyed_variant("padding", PadsPastItsLimit, pads_within_limit=True, align=16, tail_room=31,
                       trailer_len=16),
         check_round_trip, "exactly the frame limit"),
    ],
)
def test_a_broken_session_is_caught_with_a_reason(cls, check, words):
    with pytest.raises(ConformanceError, match=words):
        check(cls, KEYED, ends=KEYED_ENDS)


def test_a_stateful_refusal_is_honoured_and_an_engine_that_skips_it_is_caught():
    refusing_keyed = refusing(Keyed, options=KEYED, ends=KEYED_ENDS)
    codec = refusing_keyed.from_options({**KEYED, "self": END_A})
    assert codec.stateful and isinstance(codec.session(END_B), RefusingSession)
    check_verdicts_under_load(Keyed, KEYED, ends=KEYED_ENDS)

    def skipping_engine(*args, **kwargs) -> Engine:
        engine = Engine(*args, **kwargs)
        for peer in engine.peers.all:  # the per-peer path opening with the codec's session, not the peer's own
            if isinstance(peer.session, RefusingSession):
                peer.session = peer.session._inner
        return engine

    with pytest.raises(ConformanceError, match="plain path.*not honoured"):
        check_verdicts_under_load(Keyed, KEYED, ends=KEYED_ENDS, make=skipping_engine)


def test_the_refusing_variant_of_a_stateful_gre_keeps_its_sessions():
    cls = refusing(Gre, options={"seq": True})
    codec = cls(seq=True)
    assert codec.stateful and isinstance(codec.session(END_A), RefusingSession)
    assert not refusing(Gre)().stateful  # without seq: the decap variant, on the batched path


class HasASessionNumber(Good):
    """A header-only plugin with an attribute named ``session`` (as the ipudp example has): it must not hide the
    contract's ``session`` method from the engine or the kit."""

    name = "numbered"

    def __init__(self) -> None:
        self.session = 7


def test_an_attribute_named_session_does_not_hide_the_contract():
    check_encapsulator(HasASessionNumber)
