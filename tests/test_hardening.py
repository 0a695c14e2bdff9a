"""Bad input refused in one line (issue 15): config files that cannot be one, peer and local addresses that
cannot be, argparse's usage errors, and a privilege message that names the real cause. Each: its exit
status, one line, no traceback, nothing left behind, within 5 s."""

from __future__ import annotations

import codecs
import os
import signal
import subprocess

import pytest

from tunneld.testbed import TUNNELD, Tunneld
from tunneld.testbed.notify import NotifyReceiver
from tunneld.config.schema import ConfigError
from tunneld.config.checks import check_on_host, check_peer
from tunneld.config.loading import MAX_CONFIG_BYTES, ConfigFileError, read_text

GOOD = '[tunnel]\npeer = "192.0.2.1"\n'
# A refusal takes about a second (the interpreter and NumPy starting); this bound is there to catch a hang (a
# FIFO or /dev/zero read to the end), with room for a loaded 2-core machine, where one start took 9 s.
HANG = 20


def tunneld(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([TUNNELD, *args], capture_output=True, text=True, timeout=HANG)


def one_line(r: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


# -- configuration files ------------------------------------------------------------------------------------

def _fifo(path):
    os.mkfifo(path)  # nobody ever writes: reading it would block for ever


@pytest.mark.parametrize("make,needle", [
    (lambda p: p.write_bytes(codecs.BOM_UTF16_LE + GOOD.encode("utf-16-le")), "is UTF-16"),
    (lambda p: p.write_bytes(codecs.BOM_UTF16_BE + GOOD.encode("utf-16-be")), "is UTF-16"),
    (lambda p: p.write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256))), "is not UTF-8 text (byte 0x80 at offset"),
    (lambda p: p.write_bytes(b"[tunnel]\npeer = \"192.0.2.1\"\n# caf\xe9\n"),
     "is not UTF-8 text (byte 0xe9 at offset 33)"),
    (_fifo, "a FIFO, not a regular file"),
    (lambda p: p.mkdir(), "a directory, not a regular file"),
    (lambda p: p.write_text("# padding\n" * (MAX_CONFIG_BYTES // 10 + 1)),
     f"more than a configuration file's {MAX_CONFIG_BYTES}"),
    (lambda p: p.write_text("a = " + "[" * 200_000 + "]" * 200_000 + "\n"), "nested too deeply"),
    (lambda p: p.write_bytes(b"[tunnel]\npeer = \"192.0.2.1\"\x00\n"), "not valid TOML"),
])
def test_a_file_that_cannot_be_a_config_is_one_line_and_78(tmp_path, make, needle):
    path = tmp_path / "t.toml"
    make(path)
    for argv in (("--config", str(path), "--check"), ("--config", str(path))):
        r = tunneld(*argv)
        assert r.returncode == 78
        line = one_line(r)
        assert line.startswith(f"tunneld: {path}: ") and needle in line, line


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/null", "/dev/urandom"])
def test_a_device_is_refused_without_reading(device):
    r = tunneld("--config", device, "--check")
    assert r.returncode == 78
    assert one_line(r) == f"tunneld: {device}: cannot read: a character device, not a regular file"


def test_a_utf8_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "t.toml"
    path.write_bytes(codecs.BOM_UTF8 + GOOD.encode())
    r = tunneld("--config", str(path), "--check")
    assert r.returncode == 0, r.stderr


def test_read_text_refuses_a_file_that_grew_past_the_cap_as_it_was_read(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text("#" * (MAX_CONFIG_BYTES + 1))
    with pytest.raises(ConfigFileError, match="more than a configuration file's"):
        read_text(str(path))


# -- peer and local addresses -------------------------------------------------------------------------------

NOT_A_PEER = [
    ("0.0.0.0", "unspecified"), ("::", "unspecified"),
    ("127.0.0.1", "loopback"), ("127.3.2.1", "loopback"), ("::1", "loopback"),
    ("255.255.255.255", "broadcast"),
    ("224.0.0.1", "multicast"), ("239.1.2.3", "multicast"), ("ff02::1", "multicast"), ("ff0e::5", "multicast"),
    ("fe80::1", "link-local"), ("febf::1", "link-local"),
    ("fe80::1%eth0", "scoped link-local underlays are not supported"),
    ("::ffff:192.0.2.1", "write it as IPv4, 192.0.2.1"),
]


@pytest.mark.parametrize("peer,needle", NOT_A_PEER)
def test_a_peer_that_cannot_be_a_remote_host_is_a_usage_error(peer, needle):
    r = tunneld("--peer", peer, "--check")
    assert r.returncode == 2
    line = one_line(r)
    assert line.startswith("tunneld: error: peer: ") and needle in line


@pytest.mark.parametrize("peer,needle", NOT_A_PEER[:8])
def test_the_same_peer_in_a_file_is_78_naming_the_key(tmp_path, peer, needle):
    path = tmp_path / "t.toml"
    path.write_text(f'[tunnel]\npeer = "{peer}"\n')
    r = tunneld("--config", str(path), "--check")
    assert r.returncode == 78 and one_line(r).startswith(f"tunneld: {path}: tunnel.peer: ") and needle in r.stderr


@pytest.mark.parametrize("local,needle", [
    ("127.0.0.1", "loopback"), ("224.0.0.1", "not a unicast"), ("255.255.255.255", "not a unicast"),
    ("fe80::1", "link-local"),
])
def test_a_local_address_that_cannot_send_to_a_peer_is_refused(local, needle):
    peer = "2001:db8::1" if ":" in local else "192.0.2.1"
    r = tunneld("--peer", peer, "--local", local, "--check")
    assert r.returncode == 2 and needle in one_line(r)


def test_an_unspecified_local_address_means_any_as_leaving_it_out_does():
    assert tunneld("--peer", "192.0.2.1", "--local", "0.0.0.0", "--check").returncode == 0


def test_global_unique_local_and_ipv4_link_local_peers_are_accepted():
    for peer in ("192.0.2.1", "2001:db8::1", "fd00::2", "169.254.1.1", "10.0.0.2"):
        assert check_peer(peer) == peer


def host(kinds: dict[str, str]):
    """(address_kind, is_own) of a host with these addresses ("local") and broadcast addresses."""
    return (lambda addr: kinds.get(addr, "unicast")), (lambda addr: kinds.get(addr) == "local")


def test_on_host_the_peer_must_not_be_ours_and_local_must_be():
    check_on_host("192.0.2.1", None, *host({}))
    check_on_host("192.0.2.1", "10.0.0.1", *host({"10.0.0.1": "local"}))
    check_on_host("192.0.2.1", "0.0.0.0", *host({}))
    with pytest.raises(ConfigError, match=r"^peer: 10.0.0.1 is an address of this host"):
        check_on_host("10.0.0.1", None, *host({"10.0.0.1": "local"}))
    with pytest.raises(ConfigError, match=r"^peer: 10.0.0.255 is a broadcast address on this host's network"):
        check_on_host("10.0.0.255", None, *host({"10.0.0.255": "broadcast"}))
    with pytest.raises(ConfigError, match=r"^local: 10.9.9.9 is not an address of this host"):
        check_on_host("192.0.2.1", "10.9.9.9", *host({}))


# -- usage errors -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args,needle", [
    (("--vni", "abc"), "argument --vni: 'abc' is not a number"),
    (("--bogus",), "unrecognized arguments: --bogus"),
    (("--peer",), "argument --peer: expected one argument"),
    (("--peer", "192.0.2.1", "--mode", "nope"), "argument --mode: invalid choice: 'nope'"),
    ((), "--peer is required"),
])
def test_usage_errors_are_one_line_pointing_at_help(args, needle):
    r = tunneld(*args)
    assert r.returncode == 2
    line = one_line(r)
    assert line.startswith("tunneld: error: ") and needle in line and line.endswith(" (see tunneld --help)")


# -- on a host (namespaces) ---------------------------------------------------------------------------------

@pytest.mark.netns
@pytest.mark.parametrize("which", ["v4", "v6"])
def test_our_own_address_as_peer_is_refused_at_start_up(module_hosts, which):
    a, _ = module_hosts
    own = a.underlay if which == "v4" else a.underlay6
    r = a.run(TUNNELD, "--peer", own, "--metrics-listen", "", check=False, timeout=HANG)
    assert r.returncode == 78
    assert one_line(r) == (f"tunneld: error: peer: {own} is an address of this host: the tunnel would lead back "
                           "to itself")
    assert a.link_state("tunneld0") is None


@pytest.mark.netns
def test_a_broadcast_address_of_our_network_is_refused(module_hosts):
    a, _ = module_hosts
    r = a.run(TUNNELD, "--peer", a.underlay.rsplit(".", 1)[0] + ".255", "--metrics-listen", "", check=False, timeout=HANG)
    assert r.returncode == 78 and "is a broadcast address on this host's network" in one_line(r)
    assert a.link_state("tunneld0") is None


@pytest.mark.netns
def test_a_local_address_that_is_not_ours_is_refused_before_binding(module_hosts):
    a, b = module_hosts
    r = a.run(TUNNELD, "--peer", b.underlay, "--local", "10.99.0.1", "--metrics-listen", "", check=False, timeout=HANG)
    assert r.returncode == 78
    assert one_line(r).startswith("tunneld: error: local: 10.99.0.1 is not an address of this host")
    assert a.link_state("tunneld0") is None


@pytest.mark.netns
def test_a_reload_to_our_own_address_is_refused_and_the_tunnel_keeps_running(module_hosts, tmp_path):
    a, b = module_hosts
    path = tmp_path / "a.toml"
    path.write_text(f'[tunnel]\npeer = "{b.underlay}"\n[metrics]\nlisten = ""\n')
    rx = NotifyReceiver(str(tmp_path / "notify"))  # the daemon says when it has handled the reload
    t = Tunneld(a, "--config", str(path), env={"NOTIFY_SOCKET": rx.path})
    try:
        rx.until("READY=1")
        path.write_text(f'[tunnel]\npeer = "{a.underlay}"\n[metrics]\nlisten = ""\n')
        t.proc.send_signal(signal.SIGHUP)
        rx.until("RELOADING=1")
        rx.until("READY=1")  # the reload is over (refused), the daemon serves on
        assert t.proc.poll() is None and a.link_state("tunneld0") == "UP"
    finally:
        rx.close()
        assert t.stop() == 0
    assert f"reload refused, keeping the running configuration: {path}: tunnel.peer: {a.underlay} is an address of " \
           "this host" in (out := t.output()), out


# The device node's permissions, in a private mount namespace: a fresh node (same major/minor as the real
# one) with the mode under test is bind-mounted over /dev/net/tun there; the real node is never touched.
NODE_SCRIPT = """set -e
mount -t tmpfs -o mode=0755 tunneld-test "$1"
mknod -m "$2" "$1/tun" c 10 200
mount --bind "$1/tun" /dev/net/tun
shift 2
exec "$@"
"""


@pytest.mark.netns
@pytest.mark.parametrize("mode,caps,needle", [
    ("0600", "+net_admin", "cannot open /dev/net/tun: permission denied (mode 0600 root:root); CAP_NET_ADMIN is held"),
    ("0600", "-all", "cannot open /dev/net/tun: permission denied (mode 0600 root:root); CAP_NET_ADMIN is not held"),
    ("0666", "-all", "creating TAP device 'tunneld0' needs CAP_NET_ADMIN"),
])
def test_the_privilege_message_names_the_real_cause(module_hosts, tmp_path, mode, caps, needle):
    a, b = module_hosts
    tmp_path.chmod(0o755)
    setpriv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", f"--inh-caps={caps}"]
    if caps != "-all":
        setpriv.append(f"--ambient-caps={caps}")
    r = a.run("unshare", "--mount", "--propagation", "private", "sh", "-c", NODE_SCRIPT, "sh", str(tmp_path), mode,
              *setpriv, TUNNELD, "--peer", b.underlay, "--metrics-listen", "", "--log-level", "warning", check=False,
              timeout=HANG)
    assert r.returncode == 77, r.stderr
    line = one_line(r)
    assert line.startswith("tunneld: error: ") and needle in line, line
    assert a.link_state("tunneld0") is None
    assert os.stat("/dev/net/tun").st_rdev == os.makedev(10, 200)  # the real node is untouched


def test_on_host_every_peer_is_checked(monkeypatch):
    from tunneld import cli
    from tunneld.config.schema import TunnelConfig
    from tunneld.datapath.peers import PeerSpec

    kind, own = host({"10.0.0.1": "local"})
    monkeypatch.setattr(cli, "address_kind", kind)
    monkeypatch.setattr(cli, "is_own_address", own)
    cfg = TunnelConfig(peers=(PeerSpec("192.0.2.1"), PeerSpec("10.0.0.1")))
    with pytest.raises(cli.HostError, match=r"^demo.toml: tunnel.peer: 10.0.0.1 is an address of this host"):
        cli.on_host(cfg, "demo.toml: ")
    cli.on_host(TunnelConfig(peers=cfg.peers[:1]), "")


@pytest.mark.parametrize("peer", ["0.0.0.0", "::", "127.0.0.1", "::1", "224.0.0.1", "ff02::1", "255.255.255.255",
                                  "fe80::1", "::ffff:c000:201"])
def test_every_peer_of_many_goes_through_check_peer(peer):
    r = tunneld("--peer", "192.0.2.1" if ":" not in peer else "2001:db8::1", "--peer", peer, "--check")
    assert r.returncode == 2 and one_line(r).startswith(f"tunneld: error: peer: {peer}")
