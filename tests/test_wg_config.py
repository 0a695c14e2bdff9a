"""``--mode wireguard``'s configuration: a 0600 private key file (``tunnel.private_key`` or ``--private-key``) and
[[peer]] tables with public_key, endpoint, allowed_ips, preshared_key and persistent_keepalive, turned into the
engine's peers (id: the public key; routes: the allowed IPs) and the codec's options. Bad input is one line
that never shows a key."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tunneld.config.loading import ConfigFileError, load_file
from tunneld.config.wireguard import with_keys
from tunneld.config.schema import TunnelConfig
from tunneld.encap.wireguard import StaticKey, key_to_base64
from tunneld.encap.wireguard.codec import WireGuard

PRIVATE = bytes(range(1, 33))
PEER = key_to_base64(StaticKey(bytes(range(33, 65))).public)
PSK = bytes(range(65, 97))


def write(tmp_path, text: str, key_mode: int = 0o600):
    key = tmp_path / "a.key"
    key.write_text(key_to_base64(PRIVATE) + "\n")
    key.chmod(key_mode)
    psk = tmp_path / "p.psk"
    psk.write_text(key_to_base64(PSK) + "\n")
    psk.chmod(0o600)
    path = tmp_path / "t.toml"
    path.write_text(text)
    return path


GOOD = f"""
[tunnel]
mode = "wireguard"
private_key = "a.key"

[[peer]]
public_key = "{PEER}"
endpoint = "10.0.0.2:51820"
allowed_ips = ["10.78.0.2/32", "fd78::2/128"]
preshared_key = "p.psk"
persistent_keepalive = 25
"""


def test_peers_become_keyed_specs_with_their_allowed_ips_as_routes(tmp_path):
    values = load_file(str(write(tmp_path, GOOD)))
    (spec,) = values["peers"]
    assert spec.key == PEER and spec.address == "10.0.0.2" and spec.routes == ("10.78.0.2/32", "fd78::2/128")
    assert spec.port == 51820 and spec.where == "10.0.0.2:51820"  # a peer is sent to its own port
    other = load_file(str(write(tmp_path, GOOD.replace("10.0.0.2:51820", "10.0.0.2:4000"))))["peers"][0]
    assert other.port == 4000 and other.where == "10.0.0.2:4000"  # which need not be ours
    cfg = with_keys(TunnelConfig(**values))
    assert cfg.extra["wg_peers"] == {PEER: (PSK, 25)}
    codec = WireGuard.from_options(cfg.options())
    assert codec.describe() == f"public key {key_to_base64(StaticKey(PRIVATE).public)}"
    session = codec.session(PEER)
    assert session.peer.persistent_keepalive == 25 and session.peer.has_preshared_key


@pytest.mark.parametrize("change, words", [
    (('endpoint = "10.0.0.2:51820"\n', ""), "endpoint is required"),
    (("10.0.0.2:51820", "10.0.0.2:0"), "endpoint port 0"),
    ((PEER, "AAAA"), "public_key"),
    (('"p.psk"', '"missing.psk"'), "missing.psk"),
    (("persistent_keepalive = 25", "persistent_keepalive = -1"), "persistent_keepalive"),
])
def test_bad_peer_tables_are_one_line(tmp_path, change, words):
    with pytest.raises(ConfigFileError) as e:
        load_file(str(write(tmp_path, GOOD.replace(*change))))
    (line,) = e.value.problems
    assert words in line and key_to_base64(PSK) not in line


def test_a_key_file_others_may_read_is_refused_without_showing_the_key(tmp_path):
    path = write(tmp_path, GOOD, key_mode=0o644)
    done = subprocess.run([sys.executable, "-m", "tunneld", "--config", str(path), "--check"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 78 and "mode 0644" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert key_to_base64(PRIVATE) not in done.stderr and "Traceback" not in done.stderr
    path.chmod(0o600)
    (tmp_path / "a.key").chmod(0o600)
    done = subprocess.run([sys.executable, "-m", "tunneld", "--config", str(path), "--check"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_keys_and_peer_options_cannot_be_given_as_text(tmp_path):
    bad = GOOD.replace('private_key = "a.key"', 'private_key = "a.key"\nwg_peers = { x = 1 }')
    with pytest.raises(ConfigFileError) as e:
        load_file(str(write(tmp_path, bad)))
    assert e.value.problems == [f"{tmp_path / 't.toml'}: tunnel.wg_peers: set by the [[peer]] tables, not here"]
    for options in ({"wg_peers": {"x": 1}}, {"private_key": "a.key"}):
        with pytest.raises(ValueError):
            WireGuard.from_options(options)


def test_a_peer_from_the_command_line_is_refused_in_one_line():
    done = subprocess.run([sys.executable, "-m", "tunneld", "--mode", "wireguard", "--peer", "10.0.0.2", "--check"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "[[peer]] table" in done.stderr and len(done.stderr.strip().splitlines()) == 1
