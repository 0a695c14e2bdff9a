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
