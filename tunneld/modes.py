"""The modes (encapsulations) as the daemon builds them from a configuration."""

from __future__ import annotations

from tunneld.config import TunnelConfig
from tunneld.encap.base import Encapsulator
from tunneld.errors import EX_CONFIG, StartupError


def build_codec(cfg: TunnelConfig, modes: dict[str, type[Encapsulator]]) -> Encapsulator:
    """The codec of ``cfg.mode`` with its options; StartupError (one line) if the mode or an option is refused:
    exit status 78 (configuration), or 1 when a plugin's own code fails (its bug, not the operator's)."""
    try:
        codec_cls = modes[cfg.mode]
    except KeyError:
        raise StartupError(f"mode: unknown mode {cfg.mode!r} (known: {', '.join(modes)})", EX_CONFIG) from None
    unknown = sorted(set(cfg.extra) - set(codec_cls.options))
    if unknown:
        takes = ", ".join(codec_cls.options) or "none"
        raise StartupError(f"{cfg.mode}: does not take option {', '.join(unknown)} (it takes: {takes})", EX_CONFIG)
    try:
        return codec_cls.from_options(cfg.options())
    except (ValueError, TypeError) as e:
        raise StartupError(f"{cfg.mode}: {e}", EX_CONFIG) from None
    except Exception as e:  # a plugin's bug must read as such, not as a traceback
        raise StartupError(f"{cfg.mode}: the encapsulator failed to start: {type(e).__name__}: {e}") from None
