"""The plan without root: every start-up decision from a config and the modes, with the machine's two facts (the
underlay MTU towards the peer, the usable CPUs) passed in. The netns tests prove the real look-ups."""

from __future__ import annotations

import pytest

from tunneld.config.schema import TunnelConfig
from tunneld.runtime.daemon import Tunnel
from tunneld.encap.gre import Gre, GreTap
from tunneld.encap.vxlan import Vxlan
from tunneld.errors import EX_CONFIG, StartupError
from tunneld.runtime.plan import make_plan, stable_mac

MODES = {"vxlan": Vxlan, "gre": Gre, "gretap": GreTap}
MID = b"0123456789abcdef0123456789abcdef"


def route(mtu: int, dev: str | None = "eth0"):
    looked_up = []

    def underlay_mtu(peer: str) -> tuple[int, str | None]:
        looked_up.append(peer)
        return mtu, dev

    underlay_mtu.looked_up = looked_up
    return underlay_mtu


def plan(cfg: TunnelConfig, mtu: int = 1500, dev: str | None = "eth0", cpus: int = 2):
    return make_plan(cfg, MODES, underlay_mtu=route(mtu, dev), cpus=cpus, machine_id=MID)


def test_vxlan_over_ipv4_leaves_1450_and_derives_a_stable_mac():
    p = plan(TunnelConfig(peer="10.0.0.2", extra={"vni": 7}))
    assert (p.mtu, p.max_frame, p.underlay_mtu, p.underlay_dev) == (1450, 1464, 1500, "eth0")  # the frame: 1450 + Ethernet
    assert (p.workers, p.offload, p.port, p.vni) == (1, True, 4789, 7)
    assert p.mac == stable_mac("tunneld0", "vxlan", "10.0.0.2", 7, machine_id=MID)
    assert p.mac != stable_mac("tunneld0", "vxlan", "10.0.0.3", 7, machine_id=MID)  # the peer is in the identity
    assert int(p.mac[:2], 16) & 0x03 == 0x02  # unicast, locally administered


def test_ipv6_underlay_costs_20_more_bytes():
    assert plan(TunnelConfig(peer="fd00::2")).mtu == 1430


def test_the_route_is_looked_up_for_the_peer_and_a_missing_route_assumes_1500(caplog):
    underlay = route(1500, None)
    p = make_plan(TunnelConfig(peer="10.0.0.9"), MODES, underlay_mtu=underlay, cpus=1, machine_id=MID)
    assert underlay.looked_up == ["10.0.0.9"]
    assert p.underlay_dev is None and "no route to peer 10.0.0.9 yet" in caplog.text


def test_a_given_mtu_stands_and_one_above_the_underlay_is_warned_about(caplog):
    assert plan(TunnelConfig(peer="10.0.0.2", mtu=1400)).mtu == 1400
    assert plan(TunnelConfig(peer="10.0.0.2", mtu=1500)).mtu == 1500
    assert "mtu 1500 exceeds what the underlay carries (1500 - 50 overhead = 1450)" in caplog.text


def test_an_underlay_too_small_for_a_tunnel_is_a_configuration_error():
    with pytest.raises(StartupError, match="^the underlay MTU 100 leaves no room for a tunnel$") as e:
        plan(TunnelConfig(peer="10.0.0.2"), mtu=100)
    assert e.value.code == EX_CONFIG


def test_mode_errors_come_from_build_codec_before_any_look_up():
    underlay = route(1500)
    with pytest.raises(StartupError, match=r"^mode: 'nope' is not an available mode; available: vxlan, gre, gretap$") as e:
        make_plan(TunnelConfig(peer="10.0.0.2", mode="nope"), MODES, underlay_mtu=underlay, cpus=1)
    assert e.value.code == EX_CONFIG and underlay.looked_up == []
    with pytest.raises(StartupError, match=r"^vxlan: does not take option key \(it takes: vni\)$") as e:
        plan(TunnelConfig(peer="10.0.0.2", extra={"key": 5}))
    assert e.value.code == EX_CONFIG


def test_workers_follow_the_cpus_given_and_raw_ip_runs_one(caplog):
    assert plan(TunnelConfig(peer="10.0.0.2"), cpus=8).workers == 4
    p = plan(TunnelConfig(peer="10.0.0.2", workers=3))
    assert (p.workers, p.workers_note) == (3, None)
    p = plan(TunnelConfig(peer="10.0.0.2", mode="gre", workers=2))
    assert p.workers == 1 and "using 1" in p.workers_note
    assert (p.port, p.mac) == (47, None)  # GRE's IP protocol; a TUN device has no MAC


def test_offload_only_where_asked_and_the_codec_allows():
    assert plan(TunnelConfig(peer="10.0.0.2", offload=False)).offload is False
    assert plan(TunnelConfig(peer="10.0.0.2", mode="gre", extra={"seq": True})).offload is False
    assert plan(TunnelConfig(peer="10.0.0.2", mode="gre")).offload is True


def test_superframes_are_capped_to_one_udp_segment_send():
    p = plan(TunnelConfig(peer="10.0.0.2"))
    rows = p.superframe_cap() // (p.max_frame - 86)
    assert rows * (p.max_frame + 8) <= 65535 and (rows + 1) * (p.max_frame + 8) > 65535


def test_the_tunnel_fails_at_its_plan_before_opening_anything(monkeypatch):
    from tunneld.runtime import resources

    monkeypatch.setattr(resources.netlink, "link_exists", lambda name: pytest.fail("opened something"))
    with pytest.raises(StartupError) as e:
        Tunnel(TunnelConfig(peer="10.0.0.2"), MODES, underlay_mtu=route(60), cpus=1)
    assert e.value.code == EX_CONFIG
    with pytest.raises(StartupError) as e:
        Tunnel(TunnelConfig(peer="10.0.0.2", mode="nope"), MODES)
    assert e.value.code == EX_CONFIG


# -- many peers -----------------------------------------------------------------------------------------------

def test_the_smallest_path_mtu_over_the_peers_decides_and_is_logged(caplog):
    from tunneld.datapath.peers import PeerSpec

    mtus = {"10.0.0.2": (1500, "eth0"), "10.0.0.3": (1400, "eth1"), "10.0.0.4": (9000, "eth2")}
    cfg = TunnelConfig(peers=tuple(PeerSpec(a) for a in mtus), extra={"vni": 7})
    caplog.set_level("INFO", logger="tunneld")
    p = make_plan(cfg, MODES, underlay_mtu=mtus.__getitem__, cpus=1, machine_id=MID)
    assert (p.mtu, p.max_frame, p.underlay_mtu, p.underlay_dev, p.limiting_peer) == (1350, 1364, 1400, "eth1", "10.0.0.3")
    assert "underlay MTU 1400: the smallest path MTU, towards peer 10.0.0.3" in caplog.text
    configured = make_plan(TunnelConfig(peers=cfg.peers, mtu=1450), MODES, underlay_mtu=mtus.__getitem__, cpus=1)
    assert (configured.mtu, configured.max_frame) == (1450, 1364)  # configured wins; frames still fit the path


def test_adding_peers_keeps_the_mac_and_no_peer_names_the_tunnel_alone():
    from tunneld.datapath.peers import PeerSpec

    one = plan(TunnelConfig(peer="10.0.0.2", extra={"vni": 7}))
    three = plan(TunnelConfig(peers=(PeerSpec("10.0.0.2"), PeerSpec("10.0.0.3"), PeerSpec("10.0.0.4")), extra={"vni": 7}))
    assert one.mac == three.mac == stable_mac("tunneld0", "vxlan", "10.0.0.2", 7, machine_id=MID)
    none = plan(TunnelConfig(extra={"vni": 7}))
    assert none.mac == stable_mac("tunneld0", "vxlan", 7, machine_id=MID) and none.limiting_peer is None
