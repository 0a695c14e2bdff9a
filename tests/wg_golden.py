"""Golden WireGuard userspace-API texts: a set request and the get reply Debian's wireguard-go 0.0.20220316
gave after it (captured on this machine; tests/test_wgapi_netns.py checks them against it live)."""

PRIV_HEX = "a0" * 32

GOLDEN_SET = (
    "set=1\n"
    f"private_key={PRIV_HEX}\nlisten_port=51820\nfwmark=7\n"
    f"public_key={'22' * 32}\npreshared_key={'33' * 32}\nendpoint=[fd00::1]:123\n"
    "persistent_keepalive_interval=25\n"
    "allowed_ip=10.0.0.1/24\nallowed_ip=fd00::/64\nallowed_ip=10.9.0.0/16\n\n"
)
# wireguard-go's answer to get=1 after GOLDEN_SET: the private key clamped, host bits cleared, tx before rx.
GOLDEN_GET = (
    f"private_key={'a0' * 31}60\nlisten_port=51820\nfwmark=7\n"
    f"public_key={'22' * 32}\npreshared_key={'33' * 32}\nprotocol_version=1\nendpoint=[fd00::1]:123\n"
    "last_handshake_time_sec=0\nlast_handshake_time_nsec=0\ntx_bytes=0\nrx_bytes=0\n"
    "persistent_keepalive_interval=25\n"
    "allowed_ip=10.0.0.0/24\nallowed_ip=fd00::/64\nallowed_ip=10.9.0.0/16\n"
    "errno=0\n\n"
)
