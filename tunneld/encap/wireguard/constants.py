"""WireGuard's protocol constants (whitepaper section 6.1, wireguard-go ``device/constants.go``), under their names.

Times are seconds on the caller's clock (``now``, monotonic); the code never reads a clock itself.
"""

REKEY_AFTER_MESSAGES = 1 << 60  # the initiator starts a new handshake after sending this many on one session
REJECT_AFTER_MESSAGES = (1 << 64) - (1 << 13) - 1  # no counter at or past this is sent or accepted
REKEY_AFTER_TIME = 120.0  # the initiator starts a new handshake on sending with a session this old
REJECT_AFTER_TIME = 180.0  # a session this old neither sends nor receives
REKEY_ATTEMPT_TIME = 90.0  # give up handshaking after this long without success
REKEY_TIMEOUT = 5.0  # resend an unanswered initiation after this (plus jitter)
REKEY_TIMEOUT_JITTER_MAX = 0.334  # the jitter: uniform in [0, this) seconds
MAX_TIMER_HANDSHAKES = int(REKEY_ATTEMPT_TIME / REKEY_TIMEOUT)  # 18 retries
KEEPALIVE_TIMEOUT = 10.0  # passive keepalive: answer received data with a keepalive if we sent nothing for this long
COOKIE_REFRESH_TIME = 120.0  # a received cookie is used for mac2 this long
COOKIE_SECRET_MAX_AGE = 120.0  # the responder's cookie secret rotates this often
COOKIE_SECRET_LATENCY = 5.0  # (wireguard-go: a peer's cookie also expires this much before the secret rotates)
ZERO_KEY_MATERIAL_AFTER = REJECT_AFTER_TIME * 3  # 540 s: every key of a silent peer is dropped
# The receiving side's last-minute rekey: an initiator receiving on a session older than this starts a handshake,
# so that the session is replaced before REJECT_AFTER_TIME.
REKEY_ON_RECEIVE_AFTER = REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT  # 165 s

HANDSHAKE_INITIATION_RATE = 1 / 50  # a peer's initiations are accepted at most this often (flood)
UNDER_LOAD_AFTER_TIME = 1.0  # once under load, stay so this long
RATE_LIMIT_PACKETS_PER_SECOND = 20  # handshakes per source address, under load (wireguard-go's ratelimiter)
RATE_LIMIT_BURST = 5
RATE_LIMIT_TABLE_MAX = 4096  # source addresses the rate limiter tracks; beyond, new sources are refused while loaded
QUEUE_STAGED_SIZE = 128  # packets held for a peer while its handshake runs (wireguard-go: QueueStagedSize)
