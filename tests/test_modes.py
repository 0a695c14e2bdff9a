"""Mode options declared once, by the codec: the Option rules, build_codec's verdicts, and the derivations
(flags, config keys, --list-modes) of a mode that exists only in this file."""

from __future__ import annotations

import ast
import copy
import dataclasses
import pathlib
import pickle
from typing import ClassVar

import pytest

from tunneld import cli
from tunneld.config.schema import EX_CONFIG, TunnelConfig
from tunneld.config.loading import ConfigFileError, load_file
from tunneld.runtime.daemon import stable_mac
from tunneld.encap.base import DeviceKind, Drop, Encapsulator, Option, Transport, declare, declared, is_legacy
from tunneld.encap.gre import Gre, GreTap
from tunneld.encap.vxlan import Vxlan
from tunneld.runtime.modes import EncapsulatorFailed, ModeOptionError, build_codec, vni

ROOT = pathlib.Path(__file__).resolve().parent.parent
VNI = Vxlan.options["vni"]
SEQ = Gre.options["seq"]
COLOUR = Option("colour", str, "a colour", default="red", choices=("red", "blue"))



class Refused(str):
    """An expected ValueError line, told apart from an expected string value."""


# (option, value, what Option.check returns or the line it refuses with): a config file's typed values
CHECK = [
    (VNI, 0, 0), (VNI, 16777215, 16777215),
    (VNI, 16777216, Refused("16777216 is out of range (0-16777215)")),
    (VNI, True, Refused("expected an integer VNI (0-16777215), got boolean True")),
    (VNI, "5", Refused("expected an integer VNI (0-16777215), got string '5'")),
    (SEQ, False, False), (SEQ, 1, Refused("expected true or false, got integer 1")),
    (COLOUR, "blue", "blue"), (COLOUR, "green", Refused("'green' is not one of red, blue")),
]
# the same through Option.parse, which also takes the command line's strings
PARSE = [
    (VNI, "0x10", 16), (VNI, " 42 ", 42), (VNI, 7, 7),
    (VNI, "16777216", Refused("VNI must be between 0 and 16777215, got 16777216")),
    (VNI, True, Refused("expected an integer VNI (0-16777215), got boolean True")),
    (VNI, "ten", Refused("'ten' is not a number")),
    (SEQ, "yes", True), (SEQ, "OFF", False), (SEQ, True, True), (SEQ, "maybe", Refused("'maybe' is not yes/no")),
    (COLOUR, "red", "red"), (COLOUR, "green", Refused("'green' is not one of red, blue")),
]


def _verdict(fn, value):
    try:
        result = fn(value)
    except ValueError as e:
        return Refused(str(e))
    return result


@pytest.mark.parametrize("option,value,expected", CHECK)
def test_check(option, value, expected):
    got = _verdict(option.check, value)
    assert (type(got), got) == (type(expected), expected)


@pytest.mark.parametrize("option,value,expected", PARSE)
def test_parse(option, value, expected):
    got = _verdict(option.parse, value)
    assert (type(got), got) == (type(expected), expected)


def test_an_option_is_a_value_and_immutable():
    assert VNI == Option("vni", int, VNI.help, default=1, low=0, high=16777215, label="VNI")
    assert Option("x", int, "an x").label == "x"  # messages name the value by the option when no label is given
    with pytest.raises(AttributeError):
        VNI.default = 2
    with pytest.raises(ValueError):
        Option("x", int, "two\nlines")
    with pytest.raises(TypeError):
        Option("x", float, "a float")
    with pytest.raises(ValueError, match="declared twice"):
        declare(SEQ, SEQ)
    assert copy.deepcopy(VNI) == VNI and pickle.loads(pickle.dumps(COLOUR)) == COLOUR


def test_an_untyped_option_passes_values_as_given():
    legacy = declared(type("Old", (), {"options": {"ttl": "outer TTL"}}))["ttl"]
    assert legacy.kind is None and legacy.help == "outer TTL"
    assert legacy.check([1]) == [1] and legacy.parse("9") == "9"


# -- build_codec ------------------------------------------------------------------------------------------------

MODES = {"gre": Gre, "gretap": GreTap, "vxlan": Vxlan}


def cfg(mode: str = "vxlan", **extra) -> TunnelConfig:
    return TunnelConfig(peer="192.0.2.1", mode=mode, extra=extra)


def test_build_codec_parses_each_option_once_from_any_source():
    assert build_codec(cfg(vni=5), MODES).vni == 5  # a file's or a flag's typed value
    assert build_codec(cfg(vni="0x10"), MODES).vni == 16  # --opt vni=0x10
    assert build_codec(cfg(), MODES).vni == 1  # the declared default
    codec = build_codec(cfg("gretap", key="7", seq="yes"), MODES)
    assert (type(codec), codec.key, codec.seq, codec.csum) == (GreTap, 7, True, False)


@pytest.mark.parametrize("config,key,line", [
    (cfg("ipip"), "mode", "mode: 'ipip' is not an available mode; available: gre, gretap, vxlan"),
    (cfg(key=5), None, "vxlan: does not take option key (it takes: vni)"),
    (cfg("gre", vni=1, colour="blue"), None, "gre: does not take option colour, vni (it takes: key, seq, csum)"),
    (dataclasses.replace(cfg("gre"), port=4789), "port", "port: mode 'gre' runs over ip proto 47, it has no port"),
    (cfg(vni="16777216"), None, "vxlan: vni: VNI must be between 0 and 16777215, got 16777216"),
    (cfg("gre", seq="maybe"), None, "gre: seq: 'maybe' is not yes/no"),
])
def test_build_codec_refuses_with_one_line_and_78(config, key, line):
    with pytest.raises(ModeOptionError) as e:
        build_codec(config, MODES)
    assert (str(e.value), e.value.key, e.value.code) == (line, key, EX_CONFIG)


class Buggy(Vxlan):
    name: ClassVar[str] = "buggy"

    @classmethod
    def from_options(cls, options):
        return options["missing"]


def test_a_plugin_bug_is_one_line_and_exit_1():
    with pytest.raises(EncapsulatorFailed) as e:
        build_codec(cfg("buggy"), {"buggy": Buggy})
    assert (str(e.value), e.value.code) == ("buggy: the encapsulator failed to start: KeyError: 'missing'", 1)


def test_the_vni_accessor_keeps_every_mode_s_stable_mac():
    """The stable MAC's inputs are what they were when vni was a core field (default 1 for every mode)."""
    assert vni(Vxlan(0), default=1) == 0 and vni(Vxlan(4242)) == 4242
    assert vni(Gre(key=3)) is None and vni(GreTap(), default=1) == 1
    before = stable_mac("tunneld0", "gretap", "10.0.0.2", 1)  # cfg.vni was 1 for gretap
    assert stable_mac("tunneld0", "gretap", "10.0.0.2", vni(GreTap(), default=1)) == before


def test_reload_names_each_changed_mode_option():
    old = cfg("gre", key=1, seq=True)
    new = dataclasses.replace(old, extra={"key": 2, "csum": True}, mtu=1400)
    assert new.changed(old) == ["mtu", "key", "seq", "csum"]
    assert old.changed(old) == []


# -- a new mode touches only encap/: everything else derives from its declarations --------------------------


class Shade(Encapsulator):
    name: ClassVar[str] = "shade"
    description: ClassVar[str] = "a mode that exists only in this test"
    device: ClassVar[DeviceKind] = DeviceKind.TUN
    transport: ClassVar[Transport] = Transport("udp", 7000)
    header_room: ClassVar[int] = 0
    options = declare(
        Option("depth", int, "how deep", default=3, low=1, high=9),
        Option("dark", bool, "lights off", default=False),
        COLOUR,
        Option("port", int, "clashes with tunneld's own --port", low=1, high=2),
    )

    def __init__(self, depth: int, dark: bool, colour: str, port: int | None) -> None:
        self.depth, self.dark, self.colour, self.port = depth, dark, colour, port

    header_len = 0

    def encap(self, buf, start, end):
        return start

    def decap(self, packet):
        return Drop.TRUNCATED


def test_a_new_mode_gets_flags_keys_and_list_lines_from_its_declarations(tmp_path):
    modes = {**MODES, "shade": Shade}
    parser = cli.build_parser(modes)
    args = parser.parse_args(["--mode", "shade", "--depth", "4", "--dark", "--colour", "blue", "--opt", "port=2"])
    assert cli.given_options(args, parser.error) == {"depth": 4, "dark": True, "colour": "blue", "port": "2"}
    codec = build_codec(cfg("shade", **cli.given_options(args, parser.error)), modes)
    assert (codec.depth, codec.dark, codec.colour, codec.port) == (4, True, "blue", 2)
    with pytest.raises(SystemExit):
        parser.parse_args(["--depth", "10"])
    help_text = parser.format_help()
    assert "--depth N" in help_text and "how deep (shade; 1-9, default 3)" in help_text
    listing = cli.list_modes(modes, getattr(args, cli.OPTION_FLAGS))
    assert "option depth: how deep (1-9, default 3; --depth)" in listing
    assert "option port: clashes with tunneld's own --port (1-2, default unset; --opt port=...)" in listing
    path = tmp_path / "shade.toml"
    path.write_text('[tunnel]\nmode = "shade"\npeer = "10.0.0.2"\ndepth = 2\ncolour = "green"\nvni = 1\n')
    with pytest.raises(ConfigFileError) as e:
        load_file(str(path), modes)
    assert e.value.problems == [
        f"{path}: tunnel.colour: 'green' is not one of red, blue",
        f"{path}: tunnel.vni: only for mode vxlan, not 'shade'; mode 'shade' takes: depth, dark, colour, port",
    ]


def test_legacy_declarations_are_told_apart():
    assert is_legacy(type("Old", (), {"options": {"ttl": "outer TTL"}}))
    assert not any(is_legacy(c) for c in (Vxlan, Gre, GreTap, Shade))


OUTSIDE_ENCAP = sorted(str(p.relative_to(ROOT / "tunneld")) for p in (ROOT / "tunneld").rglob("*.py")
                       if p.relative_to(ROOT / "tunneld").parts[0] not in ("encap", "testing.py", "testbed"))


@pytest.mark.parametrize("module", OUTSIDE_ENCAP)
def test_only_encap_and_the_registry_know_the_built_in_codecs(module):
    """A new built-in mode is a module in encap/ and an entry point: nothing outside encap/ imports a codec."""
    tree = ast.parse((ROOT / "tunneld" / module).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not {m for m in imported if m and m.startswith(("tunneld.encap.gre", "tunneld.encap.vxlan"))}
    assert "from tunneld.encap import gre" not in (ROOT / "tunneld" / module).read_text()
