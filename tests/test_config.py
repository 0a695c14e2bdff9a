"""Configuration files: a table of bad files, each with the one line it must produce and exit status 78."""

from __future__ import annotations

import base64
import os
import pathlib
import subprocess
import sys
import textwrap
import tomllib

import pytest

from tunneld.cli import main
from tunneld.config.schema import EX_CONFIG, ConfigError
from tunneld.config.loading import ConfigFileError, load_file
from tunneld.datapath.peers import PeerSpec
from tunneld.encap.gre import Gre
from tunneld.encap.vxlan import Vxlan
from tunneld.encap.plugins import discover

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "config"

GOOD = """\
[tunnel]
mode = "vxlan"
peer = "10.0.0.2"
local = "10.0.0.1"
dev = "tunneld0"
address = ["192.168.100.1/24", "fd00:100::1/64"]
vni = 1
port = 4789
mtu = 1450
[metrics]
listen = "127.0.0.1:9477"
[log]
level = "info"
"""


def write(tmp_path, text: str, name: str = "demo.toml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def check(path, *extra: str) -> int:
    return main(["--config", str(path), "--check", *extra])


def test_good_file_checks_ok(tmp_path, capsys):
    path = write(tmp_path, GOOD)
    assert check(path) == 0
    assert capsys.readouterr().out.strip() == f"{path}: ok: vxlan to peer 10.0.0.2 on tunneld0"


def test_good_file_values(tmp_path):
    values = load_file(str(write(tmp_path, GOOD)), {"vxlan": Vxlan})
    values.update(values.pop("extra"))  # the mode's options (vni) sit under extra, beside the common keys
    assert values == {
        "mode": "vxlan", "peer": "10.0.0.2", "local": "10.0.0.1", "dev": "tunneld0",
        "addresses": ("192.168.100.1/24", "fd00:100::1/64"), "vni": 1, "port": 4789, "mtu": 1450,
        "metrics_listen": "127.0.0.1:9477", "log_level": "info",
    }


# (name, file text, the exact line after "tunneld: FILE: ") — every problem is one line naming the key,
# what is wrong and what is allowed.
BAD = [
    ("missing-peer", '[tunnel]\nvni = 2\n', "tunnel.peer: missing; required: the underlay address of the far end"),
    ("peer-not-ip", '[tunnel]\npeer = "10.0.0.300"\n', "tunnel.peer: '10.0.0.300' is not an IPv4 or IPv6 address"),
    ("peer-not-string", '[tunnel]\npeer = 10\n', "tunnel.peer: expected an IPv4 or IPv6 address string, got integer 10"),
    ("local-other-family", '[tunnel]\npeer = "10.0.0.2"\nlocal = "fd00::1"\n',
     "tunnel.local: fd00::1 and peer 10.0.0.2 must be of the same IP version"),
    ("unknown-key", '[tunnel]\npeer = "10.0.0.2"\nvnii = 3\n',
     "tunnel.vnii: unknown key; allowed in [tunnel]: mode, peer, local, dev, address, port, mtu, mac, offload, df, workers, vni"),
    ("unknown-section", '[tunnel]\npeer = "10.0.0.2"\n[tunel]\n',
     "tunel: unknown section; allowed: [tunnel], [[peer]], [fdb], [control], [metrics], [log], [registry]"),
    ("section-not-table", 'tunnel = 1\n', "tunnel: must be a table [tunnel], got integer 1"),
    ("gre-key-on-vxlan", '[tunnel]\npeer = "10.0.0.2"\nkey = 77\n',
     "tunnel.key: only for mode gre/gretap, not 'vxlan'; mode 'vxlan' takes: vni"),
    ("unknown-mode", '[tunnel]\nmode = "ipip"\npeer = "10.0.0.2"\n', None),  # filled in below: lists the real modes
    ("vni-range", '[tunnel]\npeer = "10.0.0.2"\nvni = 16777216\n', "tunnel.vni: 16777216 is out of range (0-16777215)"),
    ("vni-bool", '[tunnel]\npeer = "10.0.0.2"\nvni = true\n',
     "tunnel.vni: expected an integer VNI (0-16777215), got boolean True"),
    ("port-string", '[tunnel]\npeer = "10.0.0.2"\nport = "4789"\n',
     "tunnel.port: expected an integer UDP port (1-65535), got string '4789'"),
    ("port-zero", '[tunnel]\npeer = "10.0.0.2"\nport = 0\n', "tunnel.port: 0 is out of range (1-65535)"),
    ("mtu-small", '[tunnel]\npeer = "10.0.0.2"\nmtu = 60\n', "tunnel.mtu: 60 is out of range (68-65535)"),
    ("mtu-ipv6", '[tunnel]\npeer = "10.0.0.2"\nmtu = 1000\naddress = "fd00::1/64"\n',
     "tunnel.mtu: 1000 is below 1280, the minimum for an interface with IPv6"),
    ("address-no-prefix", '[tunnel]\npeer = "10.0.0.2"\naddress = ["192.168.1.1"]\n',
     "tunnel.address: '192.168.1.1' needs a prefix length, e.g. 192.168.100.1/24 or fd00::1/64"),
    ("address-not-list", '[tunnel]\npeer = "10.0.0.2"\naddress = 5\n',
     "tunnel.address: expected a CIDR string or an array of them, got integer 5"),
    ("dev-too-long", '[tunnel]\npeer = "10.0.0.2"\ndev = "a-very-long-name0"\n',
     "tunnel.dev: 'a-very-long-name0' is not a valid interface name (1-15 characters, no '/' or spaces)"),
    ("mac-multicast", '[tunnel]\npeer = "10.0.0.2"\nmac = "01:00:5e:00:00:01"\n',
     "tunnel.mac: '01:00:5e:00:00:01' is a multicast address; an interface needs a unicast one"),
    ("metrics-no-port", '[tunnel]\npeer = "10.0.0.2"\n[metrics]\nlisten = "127.0.0.1"\n',
     "metrics.listen: '127.0.0.1' is not HOST:PORT (e.g. 127.0.0.1:9477 or [::1]:9477, or an empty value to disable metrics)"),
    ("metrics-v6-brackets", '[tunnel]\npeer = "10.0.0.2"\n[metrics]\nlisten = "::1:9477"\n',
     "metrics.listen: write an IPv6 address in brackets, e.g. [::1]:9477"),
    ("metrics-port-range", '[tunnel]\npeer = "10.0.0.2"\n[metrics]\nlisten = "127.0.0.1:70000"\n',
     "metrics.listen: port '70000' is not a number between 1 and 65535 (e.g. 127.0.0.1:9477 or [::1]:9477, or an empty value to disable metrics)"),
    ("metrics-unknown-key", '[tunnel]\npeer = "10.0.0.2"\n[metrics]\nport = 9477\n',
     "metrics.port: unknown key; allowed in [metrics]: listen"),
    ("log-level", '[tunnel]\npeer = "10.0.0.2"\n[log]\nlevel = "verbose"\n',
     "log.level: 'verbose' is not a log level; allowed: debug, info, warning, error"),
    ("log-unknown-key", '[tunnel]\npeer = "10.0.0.2"\n[log]\nfile = "/tmp/x"\n',
     "log.file: unknown key; allowed in [log]: level"),
    ("toml-syntax", '[tunnel\npeer = "10.0.0.2"\n',
     "not valid TOML: Expected ']' at the end of a table declaration (at line 1, column 8)"),
]


@pytest.mark.parametrize("name,text,line", BAD, ids=[row[0] for row in BAD])
def test_bad_file_one_line_and_exit_78(tmp_path, capsys, name, text, line):
    if line is None:
        line = f"tunnel.mode: 'ipip' is not an available mode; available: {', '.join(discover()[0])}"
    path = write(tmp_path, text)
    assert check(path) == EX_CONFIG
    out = capsys.readouterr()
    assert out.err.splitlines() == [f"tunneld: {path}: {line}"]
    assert out.out == ""


def test_every_problem_is_reported_not_only_the_first(tmp_path):
    path = write(tmp_path, '[tunnel]\npeer = "x"\nport = 0\nfoo = 1\n[log]\nlevel = "loud"\n')
    with pytest.raises(ConfigFileError) as e:
        load_file(str(path))
    assert [p.split(": ")[1] for p in e.value.problems] == ["tunnel.peer", "tunnel.port", "tunnel.foo", "log.level"]


def test_missing_file(tmp_path, capsys):
    assert check(tmp_path / "absent.toml") == EX_CONFIG
    assert capsys.readouterr().err == f"tunneld: {tmp_path / 'absent.toml'}: cannot read: No such file or directory\n"


def test_flags_override_the_file(tmp_path, capsys):
    path = write(tmp_path, GOOD)
    assert check(path, "--peer", "10.0.0.9", "--dev", "td9") == 0
    assert capsys.readouterr().out.strip() == f"{path}: ok: vxlan to peer 10.0.0.9 on td9"


def test_a_flag_can_supply_what_the_file_lacks(tmp_path):
    path = write(tmp_path, '[tunnel]\nvni = 5\n')
    assert check(path, "--peer", "10.0.0.2") == 0


def test_a_bad_file_at_startup_exits_78_without_traceback(tmp_path):
    """The real entry point, as systemd runs it (not --check): one line, status 78, no traceback."""
    path = write(tmp_path, '[tunnel]\npeer = "10.0.0.2"\nvni = -1\n')
    r = subprocess.run([sys.executable, "-m", "tunneld", "--config", str(path)], capture_output=True, text=True, timeout=30)
    assert r.returncode == EX_CONFIG
    assert r.stderr.splitlines() == [f"tunneld: {path}: tunnel.vni: -1 is out of range (0-16777215)"]


def test_shipped_examples_are_valid(tmp_path):
    """config/*.toml pass --check with the modes this build has (the GRE pair once GRE is registered). A
    wireguard example names its private key file beside it (no key ships): it is checked from a copy in a
    directory that holds a fresh key, mode 0600, as `wg genkey` writes it."""
    modes = discover()[0]
    examples = sorted(EXAMPLES.glob("*.toml"))
    checked = [p for p in examples if tomllib.loads(p.read_text())["tunnel"]["mode"] in modes]
    assert {p.name for p in checked} >= {"vxlan-host-a.toml", "vxlan-host-b.toml",
                                         "wireguard-host-a.toml", "wireguard-host-b.toml"}
    for path in checked:
        tunnel = tomllib.loads(path.read_text())["tunnel"]
        if tunnel["mode"] == "wireguard":
            assert not (EXAMPLES / tunnel["private_key"]).exists()  # no private key in the source tree
            copy = tmp_path / path.stem / path.name
            copy.parent.mkdir()
            copy.write_text(path.read_text())
            key = copy.parent / tunnel["private_key"]
            key.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
            key.chmod(0o600)
            path = copy
        assert main(["--config", str(path), "--check"]) == 0, path


@pytest.mark.parametrize("host", ["a", "b"])
def test_gre_examples_match_the_schema(host):
    """The GRE options (key, seq, csum) are read and typed by the schema: the GRE codec's declarations."""
    values = load_file(str(EXAMPLES / f"gre-host-{host}.toml"), {"vxlan": Vxlan, "gre": Gre})
    assert values["mode"] == "gre"
    assert values["extra"] == {"key": 77, "seq": False, "csum": False}


@pytest.mark.parametrize("text,line", [
    ('key = -1', "tunnel.key: -1 is out of range (0-4294967295)"),
    ('seq = 1', "tunnel.seq: expected true or false, got integer 1"),
    ('csum = "no"', "tunnel.csum: expected true or false, got string 'no'"),
    ('vni = 5', "tunnel.vni: only for mode vxlan, not 'gre'; mode 'gre' takes: key, seq, csum"),
])
def test_gre_option_errors(tmp_path, text, line):
    path = write(tmp_path, f'[tunnel]\nmode = "gre"\npeer = "10.0.0.2"\n{text}\n')
    with pytest.raises(ConfigFileError) as e:
        load_file(str(path), {"vxlan": Vxlan, "gre": Gre})
    assert e.value.problems == [f"{path}: {line}"]


def test_a_plugin_mode_takes_the_options_it_declares(tmp_path):
    class Ttl:  # stands in for a plugin's Encapsulator class: only ``options`` is read here (the old form)
        options = {"ttl": "outer TTL", "tos": "outer TOS"}

    path = write(tmp_path, '[tunnel]\nmode = "ipudp"\npeer = "10.0.0.2"\nttl = 9\n')
    assert load_file(str(path), {"vxlan": Vxlan, "ipudp": Ttl})["extra"] == {"ttl": 9}
    path = write(tmp_path, '[tunnel]\nmode = "ipudp"\npeer = "10.0.0.2"\nttl = 9\nttk = 1\nvni = 3\n')
    with pytest.raises(ConfigFileError) as e:
        load_file(str(path), {"vxlan": Vxlan, "ipudp": Ttl})
    assert e.value.problems == [
        f"{path}: tunnel.ttk: unknown key; allowed in [tunnel]: mode, peer, local, dev, address, port, mtu, mac, offload, df, workers, ttl, tos",
        f"{path}: tunnel.vni: only for mode vxlan, not 'ipudp'; mode 'ipudp' takes: ttl, tos",
    ]


# -- many peers: [[peer]] tables, [fdb], [control] ----------------------------------------------------------

THREE = """\
[tunnel]
mode = "vxlan"
vni = 5
[[peer]]
address = "10.0.0.2"
name = "b"
[[peer]]
address = "10.0.0.3"
macs = ["02:00:00:00:0C:01"]
[fdb]
max = 100
ageing = 0
[control]
runtime_dir = "/run/x/"
"""


def test_peer_tables_values(tmp_path):
    from tunneld.datapath.peers import PeerSpec

    values = load_file(str(write(tmp_path, THREE)), {"vxlan": Vxlan})
    assert values["peers"] == (PeerSpec("10.0.0.2", "b"), PeerSpec("10.0.0.3", macs=("02:00:00:00:0c:01",)))
    assert (values["fdb_max"], values["fdb_ageing"], values["runtime_dir"]) == (100, 0.0, "/run/x")
    assert "peer" not in values


def test_peer_tables_check_and_count(tmp_path, capsys):
    path = write(tmp_path, THREE)
    assert check(path) == 0
    assert capsys.readouterr().out.strip() == f"{path}: ok: vxlan to 2 peers (10.0.0.2, ...) on tunneld0"


def test_flags_replace_the_files_peer_list(tmp_path, capsys):
    path = write(tmp_path, THREE)
    assert check(path, "--peer", "10.0.0.9") == 0
    assert capsys.readouterr().out.strip() == f"{path}: ok: vxlan to peer 10.0.0.9 on tunneld0"


def peers(*tables: str, mode: str = "vxlan", extra: str = "") -> str:
    return f'[tunnel]\nmode = "{mode}"\n{extra}' + "".join(f"[[peer]]\n{t}\n" for t in tables)


PEER_BAD = [
    ("both-forms", '[tunnel]\npeer = "10.0.0.2"\n[[peer]]\naddress = "10.0.0.3"\n',
     "peer: [[peer]] tables and tunnel.peer both given; name one peer as tunnel.peer or every peer in a [[peer]] table"),
    ("single-table", '[tunnel]\n[peer]\naddress = "10.0.0.3"\n',
     "peer: expected [[peer]] tables, one per peer (keys: address, name, routes, macs), got table {'address': '10.0.0.3'}"),
    ("no-address", peers('name = "b"'), "peer[1].address: missing; required: the peer's underlay IPv4 or IPv6 address"),
    ("unknown-key", peers('address = "10.0.0.2"\nroute = ["10.1.0.0/16"]'),
     "peer[1].route: unknown key; allowed in [[peer]]: address, name, routes, macs"),
    ("loopback", peers('address = "10.0.0.2"', 'address = "127.0.0.2"'),
     "peer[2].address: 127.0.0.2 is a loopback address: the tunnel would lead back to this host"),
    ("multicast-mac", peers('address = "10.0.0.2"\nmacs = ["01:00:5e:00:00:01"]'),
     "peer[1].macs: 01:00:5e:00:00:01 is not a unicast address; broadcast, multicast and unknown MACs go to every peer anyway"),
    ("bad-name", peers('address = "10.0.0.2"\nname = "b c"'),
     "peer[1].name: 'b c' is not a peer name (1-64 letters, digits and ._:@-, starting with a letter or digit)"),
    ("host-bits", peers('address = "10.0.0.2"\nroutes = ["192.168.2.1/24"]', mode="gre"),
     "peer[1].routes: 192.168.2.1/24 has host bits set; the prefix is 192.168.2.0/24"),
    ("routes-not-list", peers('address = "10.0.0.2"\nroutes = "192.168.2.0/24"', mode="gre"),
     "peer[1].routes: expected an array of strings like [\"192.168.2.0/24\"], got string '192.168.2.0/24'"),
    ("duplicate", peers('address = "10.0.0.2"', 'address = "10.0.0.02"'), None),  # filled below: not an address
    ("twice", peers('address = "fd00::2"', 'address = "fd00:0::2"'), "peer: fd00::2 is given twice"),
    ("families", peers('address = "10.0.0.2"', 'address = "fd00::3"'),
     "peer: fd00::3 and 10.0.0.2 are of different IP versions; one underlay socket carries every peer: all IPv4 or all IPv6"),
    ("local-family", peers('address = "fd00::2"', extra='local = "10.0.0.1"\n'),
     "tunnel.local: 10.0.0.1 and peer fd00::2 must be of the same IP version"),
    ("prefix-twice", peers('address = "10.0.0.2"\nroutes = ["10.1.0.0/16"]', 'address = "10.0.0.3"\nroutes = ["10.1.0.0/16"]',
                           mode="gre"),
     "peer 10.0.0.3: routes: 10.1.0.0/16 is already given to peer 10.0.0.2"),
    ("name-twice", peers('address = "10.0.0.2"\nname = "x"', 'address = "10.0.0.3"\nname = "x"'),
     "peer 10.0.0.3: name: x is already given to peer 10.0.0.2"),
    ("routes-in-l2", peers('address = "10.0.0.2"\nroutes = ["10.1.0.0/16"]'),
     "peer 10.0.0.2: routes are for L3 modes; mode 'vxlan' is L2 (TAP), whose peers are found by MAC (learnt, or static macs)"),
    ("macs-in-l3", peers('address = "10.0.0.2"\nmacs = ["02:00:00:00:00:01"]', mode="gre"),
     "peer 10.0.0.2: macs are static FDB entries of L2 modes; mode 'gre' is L3 (TUN): give the peer routes instead"),
    ("fdb-max", '[tunnel]\npeer = "10.0.0.2"\n[fdb]\nmax = 0\n', "fdb.max: 0 is out of range (1-1000000)"),
    ("fdb-ageing", '[tunnel]\npeer = "10.0.0.2"\n[fdb]\nageing = 0.5\n',
     "fdb.ageing: 0.5 is not 0 (never) or a number of seconds from 1 to 1000000"),
    ("fdb-key", '[tunnel]\npeer = "10.0.0.2"\n[fdb]\nlimit = 5\n', "fdb.limit: unknown key; allowed in [fdb]: max, ageing"),
    ("runtime-relative", '[tunnel]\npeer = "10.0.0.2"\n[control]\nruntime_dir = "run"\n',
     "control.runtime_dir: 'run' is not an absolute path, e.g. /run/tunneld"),
    ("runtime-long", '[tunnel]\npeer = "10.0.0.2"\n[control]\nruntime_dir = "/' + "x" * 100 + '"\n',
     f"control.runtime_dir: '/{'x' * 100}' is too long for a unix socket path with tunneld0.sock and a network namespace tag in it "
     "(at most 79 bytes)"),
]


@pytest.mark.parametrize("name,text,line", PEER_BAD, ids=[row[0] for row in PEER_BAD])
def test_bad_peers_one_line_and_exit_78(tmp_path, capsys, name, text, line):
    if line is None:
        line = "peer[2].address: '10.0.0.02' is not an IPv4 or IPv6 address"
    path = write(tmp_path, text)
    assert check(path) == EX_CONFIG
    out = capsys.readouterr()
    assert out.err.splitlines() == [f"tunneld: {path}: {line}"]


def test_the_peer_count_and_the_lists_are_bounded(tmp_path, capsys):
    from tunneld.config.schema import MAX_PEERS, MAX_ROUTES_PER_PEER

    many = "".join(f'[[peer]]\naddress = "10.{n >> 8}.{n & 255}.1"\n' for n in range(MAX_PEERS + 1))
    path = write(tmp_path, '[tunnel]\n' + many)
    assert check(path) == EX_CONFIG
    assert capsys.readouterr().err.splitlines() == [f"tunneld: {path}: peer: {MAX_PEERS + 1} [[peer]] tables, more than {MAX_PEERS}"]
    routes = ", ".join(f'"10.{n >> 8}.{n & 255}.0/24"' for n in range(MAX_ROUTES_PER_PEER + 1))
    path = write(tmp_path, peers(f'address = "192.0.2.1"\nroutes = [{routes}]', mode="gre"))
    assert check(path) == EX_CONFIG
    assert capsys.readouterr().err.splitlines() == [
        f"tunneld: {path}: peer[1].routes: {MAX_ROUTES_PER_PEER + 1} given, at most {MAX_ROUTES_PER_PEER} per peer"]


def test_one_l3_peer_routes_everything_several_need_routes(tmp_path, capsys, monkeypatch):
    from tunneld import cli
    from tunneld.config.schema import DEFAULT_ROUTES

    configs = []
    monkeypatch.setattr(cli, "run", lambda cfg, modes, reload=None: configs.append(cfg) or 0)
    monkeypatch.setattr(cli, "on_host", lambda cfg, where: None)  # documentation addresses are nobody's
    assert main(["--mode", "gre", "--peer", "192.0.2.1"]) == 0
    path = write(tmp_path, peers('address = "192.0.2.1"\nroutes = ["10.1.0.0/16"]', 'address = "192.0.2.2"', mode="gre"))
    assert main(["--config", str(path)]) == 0
    assert configs[0].peers[0].routes == DEFAULT_ROUTES
    assert [p.routes for p in configs[1].peers] == [("10.1.0.0/16",), ()]
    assert "peer 192.0.2.2 has no routes: it reaches nothing" in capsys.readouterr().err


@pytest.mark.parametrize("joining", [
    PeerSpec("192.0.2.9", name="b"),  # a name another peer has
    PeerSpec("192.0.2.9", macs=("02:00:00:00:00:0b",)),  # a MAC another peer has
    PeerSpec("192.0.2.9", routes=("10.2.0.0/16",)),  # a route another peer has
    PeerSpec("2001:db8::9"),  # the other IP version
    PeerSpec("192.0.2.9", name="new", macs=("02:00:00:00:00:0c",)),  # nothing taken: accepted
])
def test_a_peer_joining_a_live_table_is_judged_as_the_whole_list_would_be(joining):
    from tunneld.config.checks import check_joining, check_peers

    others = (PeerSpec("192.0.2.2", name="a", macs=("02:00:00:00:00:0a",)),
              PeerSpec("192.0.2.3", name="b", macs=("02:00:00:00:00:0b",), routes=("10.2.0.0/16",)))
    try:
        whole = check_peers((*others, joining))[-1]
    except ConfigError as e:
        with pytest.raises(ConfigError) as one:
            check_joining(others, joining)
        assert str(one.value) == str(e)
    else:
        assert check_joining(others, joining) == whole


def test_the_longest_runtime_dir_taken_still_fits_the_socket_name_a_namespaced_daemon_gives_itself():
    """A daemon outside the host's namespace tags its socket (``DEV:netINODE.sock``); a directory the check took
    must leave room for the longest tag, or the daemon fails at bind time with a kernel error instead."""
    from tunneld.config.checks import SUN_PATH_MAX, check_runtime_dir
    from tunneld.control.client import socket_path

    longest = "/" + "x" * 78
    assert check_runtime_dir(longest) == longest
    with pytest.raises(ConfigError):
        check_runtime_dir(longest + "x")
    assert len(socket_path(longest, "tunneld0", f":net{2**32 - 1}").encode()) <= SUN_PATH_MAX
