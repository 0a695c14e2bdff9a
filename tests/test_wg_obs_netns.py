"""What a running ``--mode wireguard`` tunnel tells its operator, against Debian's wireguard-go: tunneld in
namespace A (a TOML file, a 0600 key file, one [[peer]]), wireguard-go in B (configured with the stock `wg set`).

  - The MTU: over a 1500-byte IPv4 underlay tunneld's interface gets 1440 (WireGuard's 60 bytes; padding never
    passes the MTU), and a 1440-byte ping with DF crosses both ways (wireguard-go set to 1440 too); 1441 does not.
  - The metrics, scraped from tunneld, agree with `wg show NAME dump` on both sides: the bytes one side sent are
    the bytes the other received, the latest handshake is the one both report, the handshakes by result add up.
  - The interface's MTU lowered to 1420 (as wg-quick sets it): a 1420-byte packet is sealed without padding.
  - `tunneld show` (JSON and text) names the peer by its public key, with its endpoint, latest handshake,
    transfer, allowed IPs and persistent keepalive.
  - No private key (base64 or hex, of either end) appears in any scrape, log line or show output of the run.

Interface names are unique per run (wireguard-go's UAPI socket is shared by every namespace); wireguard-go is
stopped with SIGTERM and the namespaces deleted, also when the test fails."""

from __future__ import annotations

import base64
import json
import time
import uuid

import pytest

from tests.wg_go import PORT, genkey, needs, scrape, their_peer, value, wireguard_go, write_config
from tunneld.testbed import OVERLAY_V4, Tunneld, transfer

pytestmark = [pytest.mark.netns, pytest.mark.timeout(180)]

KEEPALIVE = 25
UNDERLAY_MTU = 1500
MTU = 1440  # 1500 - 20 (IPv4) - 8 (UDP) - 16 (WireGuard header) - 16 (tag)


def ping_df(host, dst: str, size: int) -> bool:
    """One ping of ``size`` payload bytes with DF set (``-M do``): whether it came back."""
    return host.run("ping", "-M", "do", "-c", "1", "-W", "3", "-s", str(size), dst, check=False).returncode == 0


def test_metrics_show_and_mtu_agree_with_wireguard_go(hosts, tmp_path):
    needs()
    a, b = hosts
    run = uuid.uuid4().hex[:8]
    ours, theirs = f"toa{run}", f"tob{run}"
    public_a = genkey(a, tmp_path / "a.key")
    public_b = genkey(b, tmp_path / "b.key")
    private_a = (tmp_path / "a.key").read_text().strip()
    private_b = (tmp_path / "b.key").read_text().strip()
    secrets = [k for p in (private_a, private_b) for k in (p, base64.b64decode(p).hex())]
    config = write_config(tmp_path / "a.toml", public_b, f"{b.underlay}:{PORT}",
                          extra=f"persistent_keepalive = {KEEPALIVE}\n")
    seen: list[str] = []  # every scrape and show output of the run, for the private-key check
    with wireguard_go(b, theirs, tmp_path / "b.key", public_a, mtu=MTU):  # tunneld initiates: no endpoint
        t = Tunneld(a, "--config", str(config), dev=ours)
        try:
            started = time.time()
            a.wait_ping(OVERLAY_V4[1], timeout=20)  # tunneld initiates: it knows where B is
            b.wait_ping(OVERLAY_V4[0], timeout=10)

            # -- the MTU: 1440 over a 1500-byte IPv4 underlay, and a 1440-byte packet crosses both ways
            shown_mtu = a.run("cat", f"/sys/class/net/{ours}/mtu").stdout.strip()
            assert shown_mtu == str(UNDERLAY_MTU - 60) == str(MTU)
            largest = MTU - 28  # ICMP payload: 1440 - 20 (IPv4) - 8 (ICMP)
            assert ping_df(a, OVERLAY_V4[1], largest), "a 1440-byte packet from tunneld did not cross"
            assert ping_df(b, OVERLAY_V4[0], largest), "a 1440-byte packet from wireguard-go did not cross"
            assert not ping_df(a, OVERLAY_V4[1], largest + 1)  # past the interface's MTU: refused at home

            sent, received = transfer(a, b, OVERLAY_V4[1], 1 << 20, timeout=60)
            assert sent == received, (sent, received)

            # -- the metrics against `wg show dump` of both sides. A bulk transfer may lose datagrams on the way
            # (wireguard-go's receive buffer), which the sender counted and the receiver never saw; so the totals
            # are compared one way, and the bytes of 20 pings (no loss at that pace) exactly, both ways.
            def counts() -> tuple[str, float, float, dict, dict]:
                text = scrape(a)
                seen.append(text)
                return (text, value(text, "tunneld_wireguard_sent_bytes_total", peer=public_b, mode="wireguard"),
                        value(text, "tunneld_wireguard_received_bytes_total", peer=public_b),
                        their_peer(b, theirs), their_peer(a, ours))

            text, ours_sent, ours_received, them, mine = counts()
            assert them["rx"] <= ours_sent and ours_received <= them["tx"], (ours_sent, ours_received, them)
            assert ours_sent > 1 << 20 and them["rx"] > 1 << 20
            deadline = time.monotonic() + 30
            while True:  # a keepalive in flight at a snapshot would show as a difference: then again
                before = counts()
                assert a.ping(OVERLAY_V4[1], count=20, interval=0.05)
                time.sleep(0.3)
                after = counts()
                sent, received = after[1] - before[1], after[2] - before[2]
                their_rx, their_tx = after[3]["rx"] - before[3]["rx"], after[3]["tx"] - before[3]["tx"]
                if (sent, received) == (their_rx, their_tx) or time.monotonic() > deadline:
                    break
            assert (sent, received) == (their_rx, their_tx), (sent, received, their_rx, their_tx)
            assert sent >= 20 * (32 + 96) and received >= 20 * (32 + 96)  # 84-byte pings padded to 96, + 32
            text, ours_sent, ours_received, them, mine = after
            assert (mine["tx"], mine["rx"]) == (ours_sent, ours_received)  # tunneld's own `wg show` agrees
            handshake = value(text, "tunneld_wireguard_latest_handshake_seconds", peer=public_b)
            assert started - 1 <= handshake <= time.time()
            assert int(handshake) == mine["latest_handshake"]
            assert abs(handshake - them["latest_handshake"]) <= 2  # the two ends complete it within an RTT
            results = {r: value(text, "tunneld_wireguard_handshakes_total", peer=public_b, result=r)
                       for r in ("initiated", "completed_as_initiator", "answered", "completed_as_responder",
                                 "timed_out", "cookie_received")}
            assert results["initiated"] >= 1 and results["completed_as_initiator"] >= 1, results
            assert results["timed_out"] == 0 and results["cookie_received"] == 0, results
            assert value(text, "tunneld_rx_packets_total", peer=public_b) > 0
            for reason in ("bad_mac", "decryption_failed", "replayed", "no_session", "expired_keys",
                           "source_not_allowed", "cookie_required"):
                assert value(text, "tunneld_dropped_packets_total", reason=reason) == 0, reason

            # -- tunneld show: the peer as `wg show` gives it
            shown = t.show()
            seen.append(json.dumps(shown))
            peer = shown["peers"][0]
            assert peer["public_key"] == public_b and them["public_key"] == public_a
            assert peer["endpoint"] == f"{b.underlay}:{PORT}" == mine["endpoint"]
            assert peer["allowed_ips"] == [f"{OVERLAY_V4[1]}/32"] and peer["persistent_keepalive"] == KEEPALIVE
            assert 0 <= peer["latest_handshake_age_s"] <= time.time() - started + 1
            assert peer["transfer_tx_bytes"] >= ours_sent and peer["transfer_rx_bytes"] >= ours_received
            assert shown["mtu"] == MTU
            human = t.client("show").stdout
            seen.append(human)
            assert f"peer: {public_b}" in human and f"  endpoint: {b.underlay}:{PORT}" in human, human
            assert f"  allowed ips: {OVERLAY_V4[1]}/32" in human and "  latest handshake: " in human, human
            assert f"  persistent keepalive: every {KEEPALIVE} seconds" in human, human
            seen.append(a.run("wg", "show", ours).stdout)

            # -- the interface's MTU lowered (as wg-quick sets 1420): tunneld pads within it, as wireguard-go does.
            # One 1420-byte ping leaves as a 1452-byte message (1420 + 32), not padded to 1424 (1456).
            a.run("ip", "link", "set", ours, "mtu", "1420")
            deadline = time.monotonic() + 15
            while True:
                before = value(scrape(a), "tunneld_wireguard_sent_bytes_total", peer=public_b)
                assert ping_df(a, OVERLAY_V4[1], 1420 - 28)
                time.sleep(0.2)
                text = scrape(a)
                seen.append(text)
                grew = value(text, "tunneld_wireguard_sent_bytes_total", peer=public_b) - before
                if grew == 1420 + 32 or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            assert grew == 1420 + 32, grew
        finally:
            status = t.stop()
        log = t.output()
        assert status == 0, log
    seen.append(log)
    for out in seen:
        for secret in secrets:
            assert secret not in out
