"""Issue 21's handshake flood against the real daemon: `tunneld --mode wireguard` in host A, Debian's wireguard-go
(configured with the stock `wg set`) in host B as the legitimate peer, and a flooder in host C (tests/wg_flood.py)
sending 10,000 handshake initiations a second for 20 s, each valid up to mac1 for tunneld's key. The three hosts
share one switched underlay (tunneld.testbed.segment). Two floods:
  - naive: one source, no mac2: under load every initiation costs tunneld a cookie reply, and nothing more;
  - cookie-following: 16 source addresses, each opening its cookie reply and sending with a valid mac2 from then
    on: past the cookie check to the per-source rate limit (20 a second, a burst of 5), and what that lets
    through reaches the key exchange, which refuses the unknown key (unknown_peer).

The flooder sends from ports the kernel picks, as a host behind NAT would: tunneld answers the address and port a
datagram came from, as wireguard-go does.

What must hold:
  - tunneld goes under load and answers the flood with cookie replies (counted on the flooder's socket, and by
    tunneld's own metric ``cookie_required``), and with nothing else;
  - every flood datagram is counted by tunneld under a reason (cookie_required; rate_limited; unknown_peer for
    the few it read before it was under load and those the rate limit let through; kernel_rcvbuf for any the
    kernel dropped while tunneld was busy), and the key exchange ran no more often than those limits allow;
  - wireguard-go, which starts its handshake during the flood, gets a cookie reply, retries with mac2 and
    completes it, and ping works both ways while the flood goes on;
  - 0 inner packets come from the flooder: what tunneld wrote to its interface is no more than what
    wireguard-go sent into its own;
  - tunneld's CPU time over the flood stays bounded per initiation (see CPU_PER_10K).

wireguard-go's interface name is unique per run (its UAPI socket /var/run/wireguard/NAME.sock is shared by every
namespace); it is stopped with SIGTERM, the flooder and tunneld are stopped, and the namespaces deleted, also
when the test fails (Host.kill_all, segment()).
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.wg_go import METRICS, PORT, drops, genkey, needs, wireguard_go, write_config
from tunneld.testbed import Tunneld
from tunneld.testbed.procfs import children_of, cpu_seconds
from tunneld.testbed.segment import SEGMENT_UNDERLAY_V4, segment
from tunneld.encap.wireguard.constants import RATE_LIMIT_BURST, RATE_LIMIT_PACKETS_PER_SECOND

pytestmark = [pytest.mark.netns, pytest.mark.serial]  # serial: it bounds CPU time, which neighbours would skew

REPO = Path(__file__).resolve().parents[1]  # where ``python -m tests.wg_flood`` finds its module
RATE = 10_000  # initiations per second, the figure
# wireguard-go retries every 5 s: its first initiation gets a cookie reply, the retry with mac2 gets through. On
# a loaded machine tunneld may not read every flood datagram and the kernel drops some (kernel_rcvbuf), maybe
# wireguard-go's too, costing it 5 s a loss: the flood lasts long enough for two of those.
FLOOD_SECONDS = 20.0
CONNECT_WITHIN = 15.0  # seconds from the first cookie reply to wireguard-go's first ping answered
# tunneld's CPU seconds per 10,000 flood initiations it handled. Under load each costs a mac1 check, a mac2
# check and a cookie reply (three BLAKE2s and one XChaCha20-Poly1305 seal, ~10 us of crypto) plus the engine's
# per-datagram Python and a sendto: measured ~0.3-0.4 s per 10,000 on this 2-CPU machine (see the report line).
# One initiation that reached the key exchange would cost ~0.2 ms (X25519 twice, ~35 us each, and the Noise
# hashing), 2 s per 10,000: the bound sits between, with room for a loaded machine's slower clock, and fails if
# flood initiations reach the expensive path.
CPU_PER_10K = 1.2
HANDSHAKE_LOAD_LIMIT = 64  # Device(handshake_load_limit=): valid-mac1 handshakes a second before it is under load


@pytest.fixture
def hosts3():
    with segment(3) as hosts:
        yield hosts


def link_packets(host, dev: str) -> tuple[int, int]:
    """(rx, tx) packets of ``dev`` as the kernel counts them."""
    [link] = json.loads(host.run("ip", "-s", "-j", "link", "show", "dev", dev).stdout)
    return link["stats64"]["rx"]["packets"], link["stats64"]["tx"]["packets"]


def first_line(proc: subprocess.Popen, timeout: float) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise TimeoutError(f"no output within {timeout}s")
    return proc.stdout.readline().strip()


def tunneld_cpu(t: Tunneld) -> float:
    return sum(cpu_seconds(pid) for pid in [t.proc.pid, *children_of([t.proc.pid], 0, timeout=0)])


FLOODS = {
    # one source, mac2 always zero: under load, every initiation costs a cookie reply and nothing more
    "naive": ("--sources", "0.0.0.0"),
    # SOURCES addresses, each taking its cookie and sending with mac2 from then on: past the cookie check to the
    # per-source rate limit, and what that lets through to the key exchange (an unknown key: unknown_peer)
    "cookie-following": ("--cookies",),
}
SOURCES = 16


@pytest.mark.timeout(180)
@pytest.mark.parametrize("flood", sorted(FLOODS))
def test_a_handshake_flood_gets_cookie_replies_while_wireguard_go_connects(hosts3, tmp_path, record_property,
                                                                           flood):
    needs()
    a, b, c = hosts3
    run = uuid.uuid4().hex[:8]
    ours, theirs = f"tfa{run}", f"tfb{run}"
    our_public = genkey(a, tmp_path / "a.key")
    their_public = genkey(b, tmp_path / "b.key")
    config = write_config(tmp_path / "a.toml", their_public, f"{b.underlay}:{PORT}", a.overlay, b.overlay)
    options = FLOODS[flood]
    if flood == "cookie-following":  # more addresses on the flooder's host, in the segment's unused range
        sources = [SEGMENT_UNDERLAY_V4.format(40 + i) for i in range(SOURCES)]
        for address in sources:
            c.run("ip", "addr", "add", f"{address}/24", "dev", c.ifname)
        options = (*options, "--sources", ",".join(sources))
    with wireguard_go(b, theirs, tmp_path / "b.key", our_public, f"{a.underlay}:{PORT}", allowed=a.overlay,
                      address=b.overlay):
        t = Tunneld(a, "--config", str(config), "--metrics-listen", METRICS, dev=ours)
        try:
            before = drops(a)
            assert not before.get("cookie_required"), before
            cpu_before = tunneld_cpu(t)
            flooder = c.popen(sys.executable, "-m", "tests.wg_flood", a.underlay, str(PORT), our_public,
                              "--rate", str(RATE), "--seconds", str(FLOOD_SECONDS), *options, cwd=REPO)
            assert first_line(flooder, 30) == "flooding"
            started = time.monotonic()
            # tunneld is under load once it answers with cookie replies
            while not drops(a).get("cookie_required"):
                assert time.monotonic() - started < 5, "no cookie reply within 5 s of the flood"
                time.sleep(0.2)
            # now the legitimate peer starts its handshake: a cookie reply first, then its retry with mac2
            try:
                took = b.wait_ping(a.overlay, timeout=CONNECT_WITHIN)
            except TimeoutError:
                shown = b.run("wg", "show", theirs, "dump", check=False).stdout
                raise AssertionError(f"wireguard-go did not connect during the flood: tunneld's drops "
                                     f"{drops(a)}, wireguard-go's peer: {shown.splitlines()[1:]}") from None
            connected = time.monotonic() - started
            assert flooder.poll() is None, "the flood ended before wireguard-go connected"
            assert b.ping(a.overlay, count=5) and a.ping(b.overlay, count=5)
            assert flooder.poll() is None, "the flood ended before the pings did"
            out, _ = flooder.communicate(timeout=FLOOD_SECONDS + 30)  # the flood's end, and its one JSON line
            assert flooder.returncode == 0, out
            outcome = json.loads(out.strip().splitlines()[-1])
            cpu = tunneld_cpu(t) - cpu_before
            after = drops(a)
            tun_rx, _ = link_packets(a, ours)
            _, wg_tx = link_packets(b, theirs)
        finally:
            status = t.stop()
        log = t.output()
    assert status == 0, log
    sent = outcome["sent"]
    counted = {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}
    rate = sent / outcome["seconds"]
    # no_route: outbound, the new interface's own IPv6 chatter, which no peer's allowed IPs take
    inbound = {k: v for k, v in counted.items() if k != "no_route"}
    handled = sum(v for k, v in inbound.items() if k != "kernel_rcvbuf")
    per_10k = cpu / handled * 10_000 if handled else float("inf")
    record_property("report", f"wireguard handshake flood ({flood}): {sent} initiations in {outcome['seconds']} s "
                              f"({rate:.0f}/s), {outcome['cookies']} cookie replies back, "
                              f"{outcome['with_mac2']} sent with mac2; tunneld drops {counted}; tunneld CPU "
                              f"{cpu:.2f} s = {per_10k:.2f} s per 10k handled; wireguard-go connected after "
                              f"{took:.1f} s ({connected:.1f} s into the flood)")
    assert rate > 0.5 * RATE, outcome  # the flooder kept (most of) its rate, or the test proves little
    # cookie replies, and nothing else, came back: one per cookie_required but wireguard-go's own (a few); 1% room
    # for replies the flooder's socket buffer lost
    assert outcome["other"] == 0, outcome
    assert 0.99 * counted["cookie_required"] - 10 <= outcome["cookies"] <= counted["cookie_required"], (outcome,
                                                                                                        counted)
    # every flood datagram counted by reason; beyond them, only wireguard-go's first initiations (a cookie
    # reply each, under load) may be
    assert set(inbound) <= {"cookie_required", "unknown_peer", "rate_limited", "kernel_rcvbuf"}, counted
    assert sent <= sum(inbound.values()) <= sent + 10, (sent, counted)
    if flood == "naive":
        assert outcome["cookies"] > 0.5 * sent, outcome
    else:
        assert outcome["opened"] >= SOURCES and outcome["with_mac2"] > 0.5 * sent, outcome
        assert inbound.get("rate_limited", 0) > 0.5 * sent, counted
    # The key exchange (X25519, what makes a handshake expensive) ran only for the initiations read before the
    # load was noticed (HANDSHAKE_LOAD_LIMIT in the first second) and, under load, for what each source's rate
    # limit let through: its burst, then RATE_LIMIT_PACKETS_PER_SECOND for the flood's length.
    sources = SOURCES if flood == "cookie-following" else 1
    allowed = HANDSHAKE_LOAD_LIMIT + sources * (RATE_LIMIT_BURST + RATE_LIMIT_PACKETS_PER_SECOND
                                                * (outcome["seconds"] + 1))
    assert inbound.get("unknown_peer", 0) <= allowed, (counted, allowed)
    # 0 inner packets from the flooder: tunneld wrote to its interface no more than wireguard-go read from its own
    assert 10 <= tun_rx <= wg_tx, (tun_rx, wg_tx)
    assert per_10k < CPU_PER_10K, (cpu, handled)
    assert (tmp_path / "a.key").read_text().strip() not in log
