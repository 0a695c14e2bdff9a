"""From a configuration to a codec: the one place that knows what a mode accepts.

``build_codec(cfg, modes)`` is the only constructor of an encapsulator from a ``TunnelConfig``. It checks, in
this order, so that the operator reads the first problem that matters:
  1. the mode exists (``ModeOptionError``, exit status 78);
  2. every option given is one the mode declares, and a port is only given to a mode that runs over UDP
     (``ModeOptionError``, 78): a setting the mode would silently ignore is an error, as a typo is;
  3. the values, by the codec's own declarations (``Option.parse`` through ``from_options``): a ValueError is
     the operator's (``ModeOptionError``, 78), anything else a bug in the encapsulator (``EncapsulatorFailed``,
     exit status 1), one line either way, never a traceback.
The command line runs it for ``--check`` and every load; the daemon builds the codec it runs with it.

``vni(codec)`` is the one accessor for the VXLAN network identifier outside the codec (the metrics label, the
stable MAC), so that nothing else asks a codec for attributes by name.
"""

from __future__ import annotations

from typing import Mapping

from tunneld.config.schema import ConfigError, TunnelConfig
from tunneld.encap.base import Encapsulator, declared
from tunneld.errors import EX_CONFIG, EX_SOFTWARE


class ModeOptionError(ConfigError):
    """The mode, an option or its value is refused. ``key`` is the setting at fault (an option's name, "port")
    or None for the mode itself, so that the command line can name the flag or file key the operator wrote;
    ``text`` is what is wrong. ``str()`` is the whole line."""

    code = EX_CONFIG

    def __init__(self, text: str, key: str | None = None) -> None:
        super().__init__(f"{key}: {text}" if key else text)
        self.key = key
        self.text = text


class EncapsulatorFailed(ConfigError):
    """The encapsulator raised something other than ValueError while being built: its bug, one line. A
    ConfigError too, so that a reload (which may build it again) refuses it as it refuses a bad file."""

    code = EX_SOFTWARE


def build_codec(cfg: TunnelConfig, modes: Mapping[str, type[Encapsulator]]) -> Encapsulator:
    """The codec for ``cfg``; raises ModeOptionError (78) or EncapsulatorFailed (1), one line each."""
    try:
        cls = modes[cfg.mode]
    except KeyError:
        raise ModeOptionError(f"{cfg.mode!r} is not an available mode; available: {', '.join(modes)}",
                              "mode") from None
    takes = declared(cls)
    unknown = sorted(set(cfg.extra) - set(takes))
    if unknown:
        raise ModeOptionError(f"{cfg.mode}: does not take option {', '.join(unknown)} "
                              f"(it takes: {', '.join(takes) or 'none'})")
    if cfg.port is not None and cls.transport.kind != "udp":
        raise ModeOptionError(f"mode {cfg.mode!r} runs over {cls.transport}, it has no port", "port")
    try:
        codec = cls.from_options(cfg.options())
    except ValueError as e:
        raise ModeOptionError(f"{cfg.mode}: {e}") from None
    except Exception as e:  # a plugin's bug must read as such, not as a traceback
        raise EncapsulatorFailed(f"{cfg.mode}: the encapsulator failed to start: {type(e).__name__}: {e}") from None
    return codec


def vni(codec: Encapsulator, default: int | None = None) -> int | None:
    """The codec's VXLAN network identifier, or ``default`` for a mode that declares no ``vni`` option."""
    return getattr(codec, "vni", default) if "vni" in declared(type(codec)) else default
