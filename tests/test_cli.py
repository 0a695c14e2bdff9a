"""The command line: what an operator sees when something is wrong — one line, the right exit status.

Without root; the refusals that need a namespace (privileges, a port or device taken) are test_cli_netns.py's."""

from __future__ import annotations

import subprocess

import pytest

from tunneld.testbed import TUNNELD


def tunneld(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([TUNNELD, *args], capture_output=True, text=True, timeout=30)


def test_help_teaches():
    r = tunneld("--help")
    assert r.returncode == 0
    for needle in ("--peer", "--vni", "4789", "1450", "examples:", "exit status:", "CAP_NET_ADMIN"):
        assert needle in r.stdout


def test_help_derives_what_code_decides():
    """The auto-worker rule and the mode options come from their one source; measured numbers stay in bench/."""
    from tunneld.encap.vxlan import Vxlan
    from tunneld.runtime.workers import AUTO_RULE

    text = " ".join(tunneld("--help").stdout.split())  # argparse wraps lines
    assert AUTO_RULE in text and "bench/results" in text
    assert f"--vni N {Vxlan.options['vni'].help} (vxlan; 0-16777215, default 1)" in text
    assert "Gbit/s" not in text


@pytest.mark.parametrize("args,status,needle", [
    (("--opt", "vni=0x2a"), 0, "command line: ok: vxlan"),
    (("--opt", "vni=abc"), 78, "tunneld: error: vxlan: vni: 'abc' is not a number"),
    (("--mode", "gre", "--opt", "seq=maybe"), 78, "tunneld: error: gre: seq: 'maybe' is not yes/no"),
    (("--opt", "vni"), 2, "--opt 'vni': expected NAME=VALUE"),
])
def test_any_mode_option_by_name(args, status, needle):
    r = tunneld("--peer", "192.0.2.1", *args, "--check")
    assert r.returncode == status and needle in r.stdout + r.stderr and "Traceback" not in r.stderr


def test_version():
    r = tunneld("--version")
    assert r.returncode == 0 and r.stdout.startswith("tunneld ")


def test_list_modes_names_vxlan():
    r = tunneld("--list-modes")
    assert r.returncode == 0
    assert any(line.split()[:3] == ["vxlan", "TAP", "udp/4789"] for line in r.stdout.splitlines())


@pytest.mark.parametrize(
    "args,needle",
    [
        ((), "--peer is required"),
        (("--peer", "10.0.0.300"), "is not an IPv4 or IPv6 address"),
        (("--peer", "192.0.2.1", "--vni", "16777216"), "VNI must be between 0 and 16777215"),
        (("--peer", "192.0.2.1", "--port", "0"), "port must be between 1 and 65535"),
        (("--peer", "192.0.2.1", "--mtu", "20"), "MTU must be between 68 and 65535"),
        (("--peer", "192.0.2.1", "--mode", "nope"), "invalid choice: 'nope'"),
        (("--peer", "192.0.2.1", "--address", "192.168.1.1"), "needs a prefix length"),
        (("--peer", "192.0.2.1", "--dev", "a-name-far-too-long"), "is not a valid interface name"),
        (("--peer", "192.0.2.1", "--mac", "01:00:5e:00:00:01"), "multicast"),
        (("--peer", "192.0.2.1", "--local", "fd00::1"), "same IP version"),
        (("--peer", "fe80::1%eth0"), "scoped link-local underlays are not supported"),
        (("--peer", "192.0.2.1", "--mtu", "1000", "--address", "fd00::1/64"), "minimum for an interface with IPv6"),
    ],
)
def test_bad_arguments_are_usage_errors(args, needle):
    # All of these are rejected while parsing, before any socket or device exists.
    r = tunneld(*args)
    assert r.returncode == 2
    assert needle in r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("tunneld: error: ")


@pytest.mark.parametrize(
    "args,needle",
    [
        (("--mode", "gre", "--vni", "7"), "--vni: only for mode vxlan, not 'gre'"),
        (("--mode", "gretap", "--port", "9"), "--port: mode 'gretap' runs over ip proto 47, it has no port"),
    ],
)
def test_settings_the_mode_would_ignore_are_refused(args, needle):
    r = tunneld("--peer", "192.0.2.1", *args, "--check")
    assert r.returncode == 78
    assert needle in r.stderr and "Traceback" not in r.stderr


def test_port_in_a_gre_config_file_is_refused(tmp_path):
    conf = tmp_path / "gre.toml"
    conf.write_text('[tunnel]\nmode = "gre"\npeer = "192.0.2.1"\nport = 4789\n')
    r = tunneld("--config", str(conf), "--check")
    assert r.returncode == 78
    assert f"{conf}: tunnel.port: mode 'gre' runs over ip proto 47, it has no port" in r.stderr


# -- many peers -----------------------------------------------------------------------------------------------

def test_help_teaches_many_peers_and_the_mtu_rule():
    text = " ".join(tunneld("--help").stdout.split())
    assert "--peer 10.0.0.2 --peer 10.0.0.3" in text  # an example with three hosts
    assert "the smallest route MTU towards any of them decides" in text
    for flag in ("--fdb-max N", "--fdb-ageing SECONDS", "--runtime-dir DIR"):
        assert flag in text


def test_peer_repeats_and_check_counts_them():
    r = tunneld("--peer", "192.0.2.1", "--peer", "192.0.2.2", "--peer", "192.0.2.3", "--fdb-max", "10",
                "--fdb-ageing", "0", "--runtime-dir", "/tmp/td", "--check")
    assert r.returncode == 0 and r.stdout.strip() == "command line: ok: vxlan to 3 peers (192.0.2.1, ...) on tunneld0"


@pytest.mark.parametrize("args,needle", [
    (("--peer", "192.0.2.1", "--peer", "192.0.2.1"), "tunneld: error: peer: 192.0.2.1 is given twice"),
    (("--peer", "192.0.2.1", "--peer", "2001:db8::1"), "of different IP versions"),
    (("--peer", "192.0.2.1", "--peer", "224.0.0.1"), "peer: 224.0.0.1 is a multicast address"),
    (("--peer", "192.0.2.1", "--fdb-max", "0"), "fdb-max must be between 1 and 1000000, got 0"),
    (("--peer", "192.0.2.1", "--fdb-ageing", "soon"), "'soon' is not a number of seconds"),
    (("--peer", "192.0.2.1", "--fdb-ageing", "-1"), "fdb-ageing: -1.0 is not 0 (never)"),
    (("--peer", "192.0.2.1", "--runtime-dir", "run"), "runtime-dir: 'run' is not an absolute path"),
])
def test_bad_peer_flags_are_usage_errors(args, needle):
    r = tunneld(*args, "--check")
    assert r.returncode == 2 and needle in r.stderr and len(r.stderr.splitlines()) == 1
