"""What a WireGuard tunnel tells its operator, on fakes: the per-peer metrics (latest handshake, handshakes by
result, the bytes ``wg show`` counts), the drops by the core's reasons, and ``tunneld show``'s WireGuard fields;
labelled by public key, bounded by the peer table, and never a private key anywhere."""

from __future__ import annotations

import base64
import json
from types import SimpleNamespace

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.wg_engines import A, B, PA, PB, PRIVATE_A, PRIVATE_B, T0, carry, engines, exchange
from tunneld.control.client import render_show
from tunneld.control.handlers import PeerControl
from tunneld.datapath.engine import Engine
from tunneld.datapath.stats import total
from tunneld.encap.base import DeviceKind, Drop
from tunneld.encap.wireguard.constants import REJECT_AFTER_TIME
from tunneld.encap.wireguard.results import HANDSHAKE_RESULTS
from tunneld.observe.metrics import TunnelCollector
from tunneld.testing import FakeClock, FakeDevice, FakeLink, random_frames


def v4_frames(count: int, seed: int = 7) -> list[bytes]:
    return [f for f in random_frames(DeviceKind.TUN, 400, seed=seed) if f[0] >> 4 == 4][:count]


def scrape(engine: Engine) -> str:
    registry = CollectorRegistry()
    registry.register(TunnelCollector(engine, dev="wg7", mtu=1440))
    return generate_latest(registry).decode()


def samples(text: str, name: str) -> dict[tuple, float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def one(text: str, name: str, **labels) -> float:
    found = [v for k, v in samples(text, name).items() if all(dict(k).get(n) == w for n, w in labels.items())]
    assert len(found) == 1, (name, labels, samples(text, name))
    return found[0]


def secrets() -> list[str]:
    return [base64.b64encode(k).decode() for k in (PRIVATE_A, PRIVATE_B)] + [k.hex() for k in (PRIVATE_A, PRIVATE_B)]


def test_per_peer_series_say_what_the_core_counted_and_name_the_peer_by_public_key():
    clock = FakeClock(T0)
    ea, eb = engines(clock, max_frame=1440)
    frames = v4_frames(5)
    ea.device.inject(frames[0])
    ea.on_device_readable()  # held; an initiation leaves
    clock.advance(0.5)
    exchange(ea, eb, rounds=6)
    for f in frames[1:]:
        ea.device.inject(f)
        ea.on_device_readable()
    exchange(ea, eb, rounds=6)
    assert eb.device.written == frames
    a, b = scrape(ea), scrape(eb)
    assert one(a, "tunneld_wireguard_latest_handshake_seconds", peer=PB) == T0 + 0.5
    assert one(b, "tunneld_wireguard_latest_handshake_seconds", peer=PA) == T0 + 0.5  # confirmed by the data
    counts_a = {r: one(a, "tunneld_wireguard_handshakes_total", peer=PB, result=r) for r in HANDSHAKE_RESULTS}
    counts_b = {r: one(b, "tunneld_wireguard_handshakes_total", peer=PA, result=r) for r in HANDSHAKE_RESULTS}
    assert counts_a == {**dict.fromkeys(HANDSHAKE_RESULTS, 0), "initiated": 1, "completed_as_initiator": 1}
    assert counts_b == {**dict.fromkeys(HANDSHAKE_RESULTS, 0), "answered": 1, "completed_as_responder": 1}
    # what one end sent the other received (nothing was lost on the fake link), and it is the core's count
    sent_a = one(a, "tunneld_wireguard_sent_bytes_total", peer=PB)
    assert sent_a == one(b, "tunneld_wireguard_received_bytes_total", peer=PA) == eb.peers.all[0].session.peer.rx_bytes
    assert one(b, "tunneld_wireguard_sent_bytes_total", peer=PA) == one(a, "tunneld_wireguard_received_bytes_total",
                                                                          peer=PB)
    # 148 (initiation) + 5 transport messages, each 32 + the frame padded to 16
    assert sent_a == 148 + sum(32 + -(-len(f) // 16) * 16 for f in frames)
    # the one peer's whole-tunnel series carry its key too (a keyed mode: the address roams)
    assert one(a, "tunneld_rx_packets_total", peer=PB) == 0 and one(b, "tunneld_rx_packets_total", peer=PA) == 5
    for text in (a, b):
        assert not any(secret in text for secret in secrets())


def test_a_removed_peers_series_go_and_a_tunnel_of_another_mode_has_none():
    clock = FakeClock(T0)
    ea, _ = engines(clock, max_frame=1440)
    assert samples(scrape(ea), "tunneld_wireguard_sent_bytes_total")
    ea.peers.remove(PB)
    text = scrape(ea)
    for name in ("tunneld_wireguard_latest_handshake_seconds", "tunneld_wireguard_sent_bytes_total",
                 "tunneld_wireguard_received_bytes_total", "tunneld_wireguard_handshakes_total"):
        assert samples(text, name) == {}, name
    from tunneld.encap.vxlan import Vxlan
    vxlan = Engine(FakeDevice(), FakeLink(B), Vxlan(7), max_frame=1450, clock=clock)
    assert "tunneld_wireguard" not in scrape(vxlan)


def test_a_handshake_nobody_answers_times_out_and_is_counted_so():
    clock = FakeClock(T0)
    ea, _ = engines(clock, max_frame=1440)
    ea.device.inject(v4_frames(1)[0])
    ea.on_device_readable()
    for _ in range(40):  # retries every 5 s (+ jitter) for 90 s, then it gives up
        clock.advance(3.0)
        ea.run_timers()
    text = scrape(ea)
    assert one(text, "tunneld_wireguard_handshakes_total", peer=PB, result="timed_out") == 1
    assert one(text, "tunneld_wireguard_handshakes_total", peer=PB, result="initiated") == 20  # 1 + 19 retries (wireguard-go too)
    assert one(text, "tunneld_wireguard_latest_handshake_seconds", peer=PB) == 0


def test_a_cookie_reply_is_counted_at_the_peer_that_accepted_it():
    clock = FakeClock(T0)
    ea, eb = engines(clock, max_frame=1440)
    eb.codec.wg.force_under_load = True
    ea.device.inject(v4_frames(1)[0])
    ea.on_device_readable()
    carry(ea, eb, A)  # the initiation, without mac2: B answers only with a cookie reply
    assert eb.stats.drops[Drop.COOKIE_REQUIRED] == 1
    carry(eb, ea, B)
    assert one(scrape(ea), "tunneld_wireguard_handshakes_total", peer=PB, result="cookie_received") == 1
    assert one(scrape(eb), "tunneld_dropped_packets_total", reason="cookie_required") == 1


def test_no_session_expired_keys_and_source_not_allowed_are_counted_on_their_paths():
    clock = FakeClock(T0)
    # B accepts from A only what comes from 10.200.0.0/24
    ea, eb = engines(clock, routes_a=("10.200.0.0/24",), max_frame=1440)
    frames = v4_frames(3)
    ea.device.inject(frames[0])
    ea.on_device_readable()
    exchange(ea, eb, rounds=6)  # the handshake; the frame itself is refused by its source
    assert eb.stats.drops[Drop.SOURCE_NOT_ALLOWED] == 1 and eb.device.written == []
    ea.device.inject(frames[1])
    ea.on_device_readable()
    late = ea.link.sent.pop()[0]
    clock.advance(REJECT_AFTER_TIME + 1)
    eb.link.deliver(late, source=A)  # a session older than 180 s
    unknown_index = bytearray(late)
    unknown_index[4:8] = b"\xff\xff\xff\xff"  # a receiver index B never handed out
    eb.link.deliver(bytes(unknown_index), source=A)
    for _ in range(3):
        eb.on_link_readable()
    text = scrape(eb)
    for reason in ("source_not_allowed", "expired_keys", "no_session"):
        assert one(text, "tunneld_dropped_packets_total", reason=reason) == 1, reason
    assert one(text, "tunneld_peer_dropped_packets_total", peer=PA) == 1  # the one drop that names the peer


def show_of(engine: Engine, port: int = 51820) -> dict:
    link = engine.link
    link.port = port
    tunnel = SimpleNamespace(
        cfg=SimpleNamespace(dev="wg7", mode="wireguard", fdb_max=0, registry=None), plan=SimpleNamespace(vni=None,
                                                                                                    mtu=1440),
        workers=1, worker=SimpleNamespace(engine=engine, link=link), registry_stats=None,
        totals=lambda: total([engine.stats]))
    return json.loads(json.dumps(PeerControl(tunnel).show(), default=list))


def test_show_gives_each_wireguard_peer_as_wg_show_does(monkeypatch):
    import tunneld.control.handlers as handlers

    monkeypatch.setattr(handlers, "UdpLink", FakeLink)  # the fake link stands for the UDP link here
    clock = FakeClock(T0)
    ea, eb = engines(clock, keepalive=25, max_frame=1440)
    ea.device.inject(v4_frames(1)[0])
    ea.on_device_readable()
    exchange(ea, eb, rounds=6)
    eb.peers.move(eb.peers.all[0], "198.51.100.4")  # roamed: show says where it is now
    monkeypatch.setattr(handlers.time, "time", lambda: T0 + 42.0)
    a, b = show_of(ea), show_of(eb)
    pa, pb = a["peers"][0], b["peers"][0]
    assert pa["public_key"] == PB and pb["public_key"] == PA
    assert pa["endpoint"] == f"{B}:51820" and pb["endpoint"] == "198.51.100.4:51820"
    assert pa["latest_handshake"] == T0 and pa["latest_handshake_age_s"] == 42.0
    assert pa["transfer_tx_bytes"] == ea.peers.all[0].session.peer.tx_bytes == pb["transfer_rx_bytes"] > 148
    assert pa["allowed_ips"] == ["0.0.0.0/0", "::/0"] and pa["persistent_keepalive"] == 25
    assert pb["persistent_keepalive"] == 0 and pa["handshakes"]["completed_as_initiator"] == 1
    text = render_show(a)
    assert f"peer: {PB}" in text and f"  endpoint: {B}:51820" in text
    assert "  allowed ips: 0.0.0.0/0, ::/0" in text and "  latest handshake: 42.0 s ago" in text
    assert "  persistent keepalive: every 25 seconds" in text and "  transfer: " in text and "  inner: " in text
    assert "persistent keepalive" not in render_show(b)
    for out in (json.dumps(a), json.dumps(b), text, render_show(b)):
        assert not any(secret in out for secret in secrets())
