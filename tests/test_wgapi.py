"""WireGuard's userspace API, sans IO: golden set/get texts, each bad input with its errno, the model's rules
(atomic sets, one owner per allowed IP, own key ignored), bounds, keys kept out of reprs and logs; and the
wireguard config file's keys. The golden replies were captured from Debian's wireguard-go 0.0.20220316 answering
the same requests (tests/test_wgapi_netns.py compares the two live)."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import os
import socket

import pytest

from tests.wg_golden import GOLDEN_GET, GOLDEN_SET, PRIV_HEX
from tunneld.config.schema import ConfigError
from tunneld.config.wireguard import parse_interface, parse_peer, read_key_file
from tunneld.control import wgapi
from tunneld.control.wgapi import (
    Endpoint,
    InterfaceConfig,
    Key,
    MemoryDevice,
    PeerStats,
    PrivateKey,
    UapiError,
    UapiServer,
    UapiSession,
    apply,
    parse_set,
    render_get,
)

K = {c: Key(bytes.fromhex(c * 32)) for c in ("22", "33", "44", "55")}
# RFC 7748 section 6.1: Alice's private key and its X25519 public key (an independent known answer).
RFC7748_PRIVATE = "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a"
RFC7748_PUBLIC = "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"


def talk(session: UapiSession, text: str | bytes) -> bytes:
    return session.receive(text.encode() if isinstance(text, str) else text)


def test_golden_set_then_get_is_wireguard_gos_reply():
    device = MemoryDevice()
    s = UapiSession(device)
    assert talk(s, GOLDEN_SET) == b"errno=0\n\n"
    assert talk(s, "get=1\n\n") == GOLDEN_GET.encode()
    [peer] = device.config.peers.values()
    assert peer.public_key == K["22"] and peer.preshared_key == K["33"] and peer.persistent_keepalive == 25
    assert peer.endpoint == Endpoint(ipaddress.ip_address("fd00::1"), 123)
    assert device.config.listen_port == 51820 and device.config.fwmark == 7 and device.commits == 1
    assert not s.closed and s.operations == 2


def test_an_empty_device_answers_get_with_errno_only():
    assert talk(UapiSession(MemoryDevice()), "get=1\n\n") == b"errno=0\n\n"


def test_bytes_fed_one_at_a_time_give_the_same_replies():
    s = UapiSession(MemoryDevice())
    out = b"".join(s.receive(bytes([b])) for b in (GOLDEN_SET + "get=1\n\n").encode())
    assert out == b"errno=0\n\n" + GOLDEN_GET.encode()


def test_a_set_cut_short_by_eof_is_applied_as_wireguard_go_does():
    device = MemoryDevice()
    s = UapiSession(device)
    assert talk(s, f"set=1\npublic_key={'22' * 32}\nallowed_ip=10.1.0.0/16") == b""
    assert s.eof() == b"errno=0\n\n" and s.closed
    assert device.config.peers[K["22"]].allowed_ips == (ipaddress.ip_network("10.1.0.0/16"),)


def test_public_key_is_derived_with_x25519():
    assert PrivateKey(bytes.fromhex(RFC7748_PRIVATE)).public_key().hex() == RFC7748_PUBLIC


# Each bad request and wireguard-go's errno for it (as it writes it: negated).
BAD = [
    ("set=1\nfoo=1\n\n", -errno.EINVAL),
    ("set=1\nnoequals\n\n", -errno.EPROTO),
    ("set=1\nlisten_port=70000\n\n", -errno.EINVAL),
    ("set=1\nlisten_port=-1\n\n", -errno.EINVAL),
    ("set=1\nfwmark=4294967296\n\n", -errno.EINVAL),
    ("set=1\nprivate_key=abc\n\n", -errno.EINVAL),
    ("set=1\nreplace_peers=false\n\n", -errno.EINVAL),
    ("set=1\npublic_key=zz\n\n", -errno.EINVAL),
    (f"set=1\npublic_key={'2' * 63}g\n\n", -errno.EINVAL),
    (f"set=1\npublic_key={'22' * 32}\nendpoint=1.2.3.4\n\n", -errno.EINVAL),
    (f"set=1\npublic_key={'22' * 32}\nendpoint=fd00::1:51820\n\n", -errno.EINVAL),
    (f"set=1\npublic_key={'22' * 32}\nendpoint=example.org:51820\n\n", -errno.EINVAL),
    (f"set=1\npublic_key={'22' * 32}\nendpoint=1.2.3.4:65536\n\n", -errno.EINVAL),
    (f"set=1\npublic_key={'22' * 32}\nallowed_ip=1.2.3.4\n\n", -errno.EINVAL),
    (f"set=1\npublic_key={'22' * 32}\nallowed_ip=1.2.3.4/33\n\n", -errno.EINVAL),
    (f"set=1\npublic_key={'22' * 32}\nallowed_ip=1.2.3.4/255.0.0.0\n\n", -errno.EINVAL),
    (f"set=1\npublic_key={'22' * 32}\npersistent_keepalive_interval=65536\n\n", -errno.EINVAL),
    (f"set=1\npublic_key={'22' * 32}\nprotocol_version=2\n\n", -errno.EINVAL),
    (f"set=1\npublic_key={'22' * 32}\nremove=yes\n\n", -errno.EINVAL),
    (f"set=1\npublic_key={'22' * 32}\nlisten_port=1\n\n", -errno.EINVAL),  # an interface key in a peer section
    (f"set=1\npublic_key={'22' * 32}\npreshared_key=00\n\n", -errno.EINVAL),
    ("get=1\nx\n", -errno.EINVAL),
]


@pytest.mark.parametrize("request_text, code", BAD, ids=[b[0].split("\n")[-3][:30] for b in BAD])
def test_bad_input_gets_wireguard_gos_errno_and_changes_nothing(request_text, code):
    device = MemoryDevice()
    s = UapiSession(device)
    assert talk(s, GOLDEN_SET) == b"errno=0\n\n"
    before = device.config
    assert talk(s, request_text) == f"errno={code}\n\n".encode()
    assert device.config is before and device.commits == 1


def test_a_bad_last_line_leaves_the_whole_set_untaken():
    device = MemoryDevice()
    s = UapiSession(device)
    assert talk(s, f"set=1\nlisten_port=1\npublic_key={'22' * 32}\nallowed_ip=10.0.0.0/8\nbogus=1\n\n") \
        == b"errno=-22\n\n"
    assert device.config == InterfaceConfig() and device.commits == 0
    assert talk(s, "get=1\n\n") == b"errno=0\n\n"  # the connection stays in step after a refused set


def test_an_unknown_operation_closes_without_a_reply():
    s = UapiSession(MemoryDevice())
    assert talk(s, "bogus=1\n\nget=1\n\n") == b"" and s.closed


def test_an_over_long_line_is_refused_and_the_connection_closed():
    s = UapiSession(MemoryDevice())
    assert talk(s, "set=1\nendpoint=" + "1" * wgapi.MAX_LINE) == f"errno=-{errno.EMSGSIZE}\n\n".encode()
    assert s.closed and talk(s, "get=1\n\n") == b""


def test_an_over_long_request_is_refused(monkeypatch):
    monkeypatch.setattr(wgapi, "MAX_REQUEST", 1000)
    s = UapiSession(MemoryDevice())
    body = "".join(f"allowed_ip=10.{i // 256}.{i % 256}.0/24\n" for i in range(100))
    assert talk(s, f"set=1\npublic_key={'22' * 32}\n{body}\n") == f"errno=-{errno.EMSGSIZE}\n\n".encode()
    assert s.closed and s.device.commits == 0


def test_peers_and_allowed_ips_are_bounded(monkeypatch):
    monkeypatch.setattr(wgapi, "MAX_PEERS", 3)
    monkeypatch.setattr(wgapi, "MAX_ALLOWED_IPS", 2)
    device = MemoryDevice()
    s = UapiSession(device)
    three = "".join(f"public_key={c * 32}\n" for c in ("22", "33", "44"))
    assert talk(s, f"set=1\n{three}\n") == b"errno=0\n\n"
    assert talk(s, f"set=1\npublic_key={'55' * 32}\n\n") == f"errno=-{errno.ENOSPC}\n\n".encode()
    four = three + f"public_key={'55' * 32}\n"
    assert talk(s, f"set=1\nreplace_peers=true\n{four}\n") == f"errno=-{errno.ENOSPC}\n\n".encode()
    ips = "".join(f"allowed_ip=10.0.{i}.0/24\n" for i in range(3))
    assert talk(s, f"set=1\npublic_key={'22' * 32}\n{ips}\n") == f"errno=-{errno.ENOSPC}\n\n".encode()
    assert len(device.config.peers) == 3 and device.commits == 1
    monkeypatch.setattr(wgapi, "MAX_TOTAL_ALLOWED_IPS", 4)
    two = "allowed_ip=10.1.0.0/24\nallowed_ip=10.2.0.0/24\n"
    assert talk(s, f"set=1\npublic_key={'22' * 32}\n{two}public_key={'33' * 32}\n{two.replace('0/', '1/')}\n") \
        == b"errno=0\n\n"  # 10.x.0.1/24 is 10.x.0.0/24 again: it moves, the total stays 2
    assert talk(s, f"set=1\npublic_key={'44' * 32}\n{two.replace('.0.0/', '.9.0/')}"
                   f"allowed_ip=10.7.0.0/24\n\n") == f"errno=-{errno.ENOSPC}\n\n".encode()
    assert talk(s, "set=1\n" + "".join(f"public_key={'44' * 32}\nallowed_ip=10.{i}.0.0/16\n" for i in range(5))
                + "\n") == f"errno=-{errno.ENOSPC}\n\n".encode()  # the request's own count
    assert device.commits == 2


def test_an_allowed_ip_moves_to_the_last_peer_that_claims_it():
    config = apply(InterfaceConfig(), parse_set(
        f"public_key={'22' * 32}\nallowed_ip=10.0.0.0/24\nallowed_ip=10.1.0.0/24\n"
        f"public_key={'33' * 32}\nallowed_ip=10.0.0.5/24\n"))
    assert [str(n) for n in config.peers[K["22"]].allowed_ips] == ["10.1.0.0/24"]
    assert [str(n) for n in config.peers[K["33"]].allowed_ips] == ["10.0.0.0/24"]


def test_remove_update_only_replace_and_zero_keys():
    config = apply(InterfaceConfig(), parse_set(
        f"public_key={'22' * 32}\npreshared_key={'33' * 32}\nallowed_ip=10.0.0.0/24\nendpoint=192.0.2.1:1\n"
        f"public_key={'33' * 32}\nallowed_ip=10.3.0.0/24\n"))
    config = apply(config, parse_set(
        f"public_key={'22' * 32}\npreshared_key={'00' * 32}\nreplace_allowed_ips=true\nallowed_ip=10.2.0.0/24\n"
        f"public_key={'33' * 32}\nremove=true\n"
        f"public_key={'44' * 32}\nupdate_only=true\nallowed_ip=10.4.0.0/24\n"))
    assert list(config.peers) == [K["22"]]
    peer = config.peers[K["22"]]
    assert peer.preshared_key is None and [str(n) for n in peer.allowed_ips] == ["10.2.0.0/24"]
    assert str(peer.endpoint) == "192.0.2.1:1"  # untouched lines stay
    config = apply(config, parse_set(f"replace_peers=true\npublic_key={'55' * 32}\n"))
    assert list(config.peers) == [K["55"]]


def test_the_interfaces_own_public_key_is_never_a_peer():
    own = PrivateKey(bytes.fromhex(RFC7748_PRIVATE)).public_key()
    config = apply(InterfaceConfig(), parse_set(f"public_key={RFC7748_PUBLIC}\npublic_key={'22' * 32}\n"))
    assert own in config.peers
    config = apply(config, parse_set(f"private_key={RFC7748_PRIVATE}\n"))  # setting the key drops that peer
    assert list(config.peers) == [K["22"]]
    config = apply(config, parse_set(f"public_key={RFC7748_PUBLIC}\nallowed_ip=10.0.0.0/8\n"))  # and ignores it
    assert list(config.peers) == [K["22"]]
    config = apply(config, parse_set(f"private_key={'00' * 32}\n"))
    assert config.private_key is None and config.public_key is None


def test_diff_tells_a_device_what_a_commit_changed():
    old = apply(InterfaceConfig(), parse_set(
        f"private_key={PRIV_HEX}\nlisten_port=1\npublic_key={'22' * 32}\npublic_key={'33' * 32}\n"))
    new = apply(old, parse_set(f"listen_port=2\npublic_key={'22' * 32}\nendpoint=192.0.2.1:1\n"
                               f"public_key={'33' * 32}\nremove=true\npublic_key={'44' * 32}\n"))
    d = wgapi.diff(old, new)
    assert (d.private_key, d.listen_port, d.fwmark) == (False, True, False)
    assert (d.added, d.removed, d.changed) == ((K["44"],), (K["33"],), (K["22"],))
    assert wgapi.diff(new, new) == wgapi.ConfigDiff(False, False, False, (), (), ())
    assert wgapi.change_summary(old, new) == "peers 2 (+1 -1 ~1), private key kept, listen_port 2, fwmark 0"


def test_endpoints_render_as_go_prints_them():
    for text in ("192.0.2.1:51820", "[2001:db8::1]:1", "[::ffff:192.0.2.1]:9", "[fe80::1%eth0]:7"):
        assert str(Endpoint.parse(text)) == text


def test_live_stats_and_a_roamed_endpoint_come_from_the_device():
    config = apply(InterfaceConfig(), parse_set(f"public_key={'22' * 32}\nendpoint=192.0.2.1:1\n"))
    stats = PeerStats(last_handshake_ns=1_700_000_000_123_456_789, rx_bytes=5, tx_bytes=7,
                      endpoint=Endpoint.parse("198.51.100.9:4"))
    text = render_get(config, lambda key: stats if key == K["22"] else wgapi.NO_STATS)
    assert ("endpoint=198.51.100.9:4\nlast_handshake_time_sec=1700000000\nlast_handshake_time_nsec=123456789\n"
            "tx_bytes=7\nrx_bytes=5\n") in text


def test_a_device_that_refuses_keeps_the_old_config():
    class Busy(MemoryDevice):
        def commit(self, config):
            if config.listen_port == 1:
                raise UapiError(wgapi.EADDRINUSE, "listen_port 1: in use")
            super().commit(config)

    device = Busy()
    s = UapiSession(device)
    assert talk(s, "set=1\nlisten_port=1\n\n") == f"errno=-{errno.EADDRINUSE}\n\n".encode()
    assert device.config.listen_port == 0


def test_keys_never_reach_a_repr_an_error_or_a_log(caplog):
    caplog.set_level(logging.DEBUG, logger="tunneld")
    device = MemoryDevice()
    s = UapiSession(device)
    talk(s, GOLDEN_SET)
    talk(s, f"set=1\nprivate_key={PRIV_HEX[:-1]}\n\n")
    talk(s, f"set=1\npublic_key={'22' * 32}\n{'33' * 32}=1\n\n")
    talk(s, f"{'44' * 32}=1\n")
    with pytest.raises(UapiError) as e:
        parse_set(f"public_key={'22' * 32}\npreshared_key={'3' * 63}x\n")
    seen = repr(device.config) + str(device.config) + str(e.value) + caplog.text
    for secret in (PRIV_HEX, PRIV_HEX[:40], "2222222222", "3333333333", "4444444444", K["22"].base64()):
        assert secret not in seen
    assert "Key(<hidden>)" in repr(device.config) and caplog.records  # there was something to look at


# -- the server, on a unix socket in a temporary directory (no root needed) --------------------------------------

async def _exchange(path: str, data: bytes, shut: bool = True) -> bytes:
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(data)
    if shut:
        writer.write_eof()
    try:
        return await asyncio.wait_for(reader.read(), 5)
    except ConnectionResetError:  # closed by the server before it read what was sent
        return b""
    finally:
        writer.close()


def test_server_serves_replaces_a_stale_socket_refuses_a_live_one_and_cleans_up(tmp_path):
    async def main():
        path = str(tmp_path / "wgt0.sock")
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(path)
        stale.close()  # a file with no listener: a process that died
        device = MemoryDevice()
        async with UapiServer("wgt0", device, directory=str(tmp_path)) as server:
            assert os.stat(path).st_mode & 0o777 == 0o700  # umask 077, as wireguard-go's
            with pytest.raises(wgapi.UapiSocketError, match="is in use"):
                await UapiServer("wgt0", MemoryDevice(), directory=str(tmp_path)).start()
            for _ in range(3):  # `wg show interfaces`: connect, hang up
                _, w = await asyncio.open_unix_connection(path)
                w.close()
            assert await _exchange(path, GOLDEN_SET.encode() + b"get=1\n\n") == b"errno=0\n\n" + GOLDEN_GET.encode()
            assert server.clients in (0, 1)
        assert not os.path.exists(path)
    asyncio.run(main())


def test_server_bounds_clients_and_drops_idle_ones(tmp_path):
    async def main():
        path = str(tmp_path / "wgt1.sock")
        async with UapiServer("wgt1", MemoryDevice(), directory=str(tmp_path), max_clients=2,
                              idle_timeout=0.3) as server:
            held = [await asyncio.open_unix_connection(path) for _ in range(2)]
            for _ in range(50):  # wait (bounded) until both are being served
                if server.clients == 2:
                    break
                await asyncio.sleep(0.02)
            assert await _exchange(path, b"get=1\n\n") == b""  # a third: closed at once, no reply
            assert server.refused == 1
            for reader, _ in held:  # idle: dropped after idle_timeout
                assert await asyncio.wait_for(reader.read(), 3) == b""
            assert await _exchange(path, b"get=1\n\n") == b"errno=0\n\n"
    asyncio.run(main())


def test_a_client_that_trickles_is_dropped_within_the_idle_timeout(tmp_path):
    async def main():
        path = str(tmp_path / "wgt2.sock")
        async with UapiServer("wgt2", MemoryDevice(), directory=str(tmp_path), idle_timeout=0.3):
            reader, writer = await asyncio.open_unix_connection(path)
            start = asyncio.get_running_loop().time()
            with pytest.raises((ConnectionError, AssertionError)):
                for b in b"set=1\nlisten_port=1" * 10:  # a byte every 50 ms: never idle, never done
                    writer.write(bytes([b]))
                    await writer.drain()
                    await asyncio.sleep(0.05)
                    assert not reader.at_eof()
            assert await asyncio.wait_for(reader.read(), 3) == b""
            assert asyncio.get_running_loop().time() - start < 2
            writer.close()
    asyncio.run(main())


def test_interface_names_are_checked():
    for bad in ("", "a/b", "..", "x" * 16, "wg 0"):
        with pytest.raises(ValueError):
            wgapi.socket_path(bad)
    assert wgapi.socket_path("wg0") == "/var/run/wireguard/wg0.sock"


# -- the config file's wireguard keys ------------------------------------------------------------------------------

def _key_file(tmp_path, name: str, key: Key, mode: int = 0o600) -> str:
    path = tmp_path / name
    path.write_text(key.base64() + "\n")
    os.chmod(path, mode)
    return str(path)


def test_config_file_builds_the_same_model_the_uapi_edits(tmp_path):
    priv = PrivateKey(bytes.fromhex(PRIV_HEX))
    _key_file(tmp_path, "wg.key", priv)
    _key_file(tmp_path, "b.psk", K["33"])
    config = parse_interface(
        {"private_key": "wg.key", "listen_port": 51820, "fwmark": 7},
        [{"public_key": K["22"].base64(), "preshared_key": "b.psk", "endpoint": "[fd00::1]:123",
          "persistent_keepalive": 25, "allowed_ips": ["10.0.0.1/24", "fd00::/64", "10.9.0.0/16"]}],
        base_dir=str(tmp_path))
    assert config == apply(InterfaceConfig(), parse_set(GOLDEN_SET.split("\n", 1)[1]))
    assert render_get(config) + "errno=0\n\n" == GOLDEN_GET


@pytest.mark.parametrize("tunnel, peers, message", [
    ({"private_key": "loose.key"}, [], "is mode 0644; a key file must be mode 0600"),
    ({"private_key": "missing.key"}, [], "No such file"),
    ({"private_key": "garbage.key"}, [], "not a key"),
    ({}, [{"public_key": "short"}], "public_key: not a base64 key"),
    ({}, [{}], "public_key is required"),
    ({}, [{"public_key": "P22", "address": "10.0.0.1"}], "unknown key 'address'"),
    ({}, [{"public_key": "P22", "endpoint": "host.example:1"}], "numeric addresses only"),
    ({}, [{"public_key": "P22", "allowed_ips": "10.0.0.0/8"}], "a list of prefixes"),
    ({}, [{"public_key": "P22", "allowed_ips": ["10.0.0.0/33"]}], "is not ADDRESS/PREFIXLEN"),
    ({}, [{"public_key": "P22", "persistent_keepalive": 70000}], "persistent_keepalive: an integer"),
    ({}, [{"public_key": "P22", "preshared_key": "loose.key"}], "must be mode 0600"),
    ({}, [{"public_key": "P22"}, {"public_key": "P22"}], "public_key is also peer 1's"),
    ({}, [{"public_key": "P22", "allowed_ips": ["10.0.0.0/8"]},
          {"public_key": "P33", "allowed_ips": ["10.1.2.3/8"]}], "10.0.0.0/8 is also peer 1's"),
    ({"private_key": "wg.key"}, [{"public_key": "POWN"}], "this interface's own"),
    ({"listen_port": 65536}, [], "listen_port: an integer"),
])
def test_config_file_mistakes_are_one_clear_line(tmp_path, tunnel, peers, message):
    priv = PrivateKey(bytes.fromhex(PRIV_HEX))
    _key_file(tmp_path, "wg.key", priv)
    _key_file(tmp_path, "loose.key", priv, 0o644)
    (tmp_path / "garbage.key").write_text("a" * 200 + PRIV_HEX)
    os.chmod(tmp_path / "garbage.key", 0o600)
    names = {"P22": K["22"].base64(), "P33": K["33"].base64(), "POWN": priv.public_key().base64()}
    peers = [{k: names.get(v, v) if k == "public_key" else v for k, v in p.items()} for p in peers]
    with pytest.raises(ConfigError) as e:
        parse_interface(tunnel, peers, base_dir=str(tmp_path))
    text = str(e.value)
    assert message in text and "\n" not in text
    for secret in (priv.base64(), priv.hex(), PRIV_HEX, "aaaaaaaaaa"):
        assert secret not in text


def test_a_key_files_mode_is_its_targets_through_a_symlink(tmp_path):
    target = _key_file(tmp_path, "wg.key", K["22"])
    os.symlink(target, tmp_path / "link.key")  # the link itself is 0777: what counts is the file read
    assert read_key_file(str(tmp_path / "link.key")) == K["22"]
    os.chmod(target, 0o640)
    with pytest.raises(ConfigError, match="link.key is mode 0640"):
        read_key_file(str(tmp_path / "link.key"))
    assert parse_peer({"public_key": K["22"].base64()}).allowed_ips == ()


# -- any input: a reply or a close, never an exception --------------------------------------------------------------

from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

_LINE_KEYS = ["private_key", "listen_port", "fwmark", "replace_peers", "public_key", "remove", "update_only",
              "preshared_key", "endpoint", "persistent_keepalive_interval", "replace_allowed_ips", "allowed_ip",
              "protocol_version", "bogus", ""]
_VALUES = st.one_of(st.sampled_from(["true", "false", "1", "0", "65535", "65536", "22" * 32, "00" * 32,
                                     "10.0.0.0/8", "fd00::/64", "1.2.3.4:5", "[::1]:5", "[fe80::1%x]:1"]),
                    st.text(max_size=70))
_LINES = st.one_of(st.builds(lambda k, v: f"{k}={v}", st.sampled_from(_LINE_KEYS), _VALUES),
                   st.sampled_from(["set=1", "get=1", ""]), st.text(max_size=20))


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_LINES, max_size=40), st.integers(1, 64))
def test_any_lines_get_well_formed_replies(lines, chunk):
    device = MemoryDevice()
    s = UapiSession(device)
    data = ("set=1\n" + "\n".join(lines) + "\n\n").encode("utf-8", "surrogatepass")
    out = b"".join(s.receive(data[i:i + chunk]) for i in range(0, len(data), chunk)) + s.eof()
    assert s.closed
    for reply in filter(None, out.split(b"\n\n")):
        assert reply.rsplit(b"\n", 1)[-1].startswith(b"errno="), out
    text = render_get(device.config)  # whatever was taken renders, and parses back to the same model
    lines = [line for line in text.splitlines() if not line.startswith(("last_handshake", "tx_bytes", "rx_bytes"))]
    again = apply(InterfaceConfig(), parse_set("\n".join(lines) + "\n"))
    assert again == device.config
