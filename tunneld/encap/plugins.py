"""The encapsulator registry: every mode, built-in or third-party, is an entry point.

A package adds a mode by declaring, in its pyproject.toml::

    [project.entry-points."tunneld.encapsulators"]
    mymode = "mypackage.codec:MyEncapsulator"

A plugin that fails to import or is not an ``Encapsulator`` is reported by name and skipped; it never takes
the other modes down with it. A plugin declares its options in its ``options`` class attribute
(``declare(Option(...), ...)``, as the built-in modes do); flags, config keys and --list-modes lines follow from
them, and the values reach its ``from_options`` through ``TunnelConfig.extra``. The old form, name -> help
text, still loads (the options are untyped: values arrive as given) with a deprecation warning at start-up.
``tunneld.testing.EncapsulatorConformance`` is the suite a plugin author runs against their class.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Mapping

from tunneld.encap.base import DeviceKind, Encapsulator, Option, Transport

GROUP = "tunneld.encapsulators"


@dataclass(frozen=True)
class BrokenPlugin:
    name: str
    target: str
    problem: str


def _check(name: str, obj: object) -> str | None:
    """What is wrong with a loaded plugin object, or None."""
    if not (isinstance(obj, type) and issubclass(obj, Encapsulator)):
        return "is not a subclass of tunneld.encap.Encapsulator"
    missing = [a for a in ("name", "description", "device", "transport", "header_room") if not hasattr(obj, a)]
    if missing:
        return f"does not declare {', '.join(missing)}"
    if obj.name != name:
        return f"declares name {obj.name!r} but is registered as {name!r}"
    if not isinstance(obj.device, DeviceKind) or not isinstance(obj.transport, Transport):
        return "device must be a DeviceKind and transport a Transport"
    options = getattr(obj, "options", None)
    # an Option each, or (deprecated, read by encap.base.declared as untyped options) a help string each
    if not isinstance(options, Mapping) or not all(isinstance(k, str) and isinstance(v, (Option, str))
                                                   for k, v in options.items()):
        return "options must map each name to a tunneld.encap.base.Option (declare(Option(...), ...))"
    misnamed = [k for k, v in options.items() if isinstance(v, Option) and v.name != k]
    if misnamed:
        return f"declares options under names that are not theirs: {', '.join(misnamed)}"
    if getattr(obj, "__abstractmethods__", None):
        return f"does not implement {', '.join(sorted(obj.__abstractmethods__))}"
    return None


def discover() -> tuple[dict[str, type[Encapsulator]], list[BrokenPlugin]]:
    """All registered encapsulators by mode name, and the plugins that could not be loaded."""
    modes: dict[str, type[Encapsulator]] = {}
    broken: list[BrokenPlugin] = []
    for ep in entry_points(group=GROUP):
        try:
            obj = ep.load()
        except Exception as e:  # a plugin's import may fail in any way; it must not take us down
            broken.append(BrokenPlugin(ep.name, ep.value, f"failed to import: {type(e).__name__}: {e}"))
            continue
        problem = _check(ep.name, obj)
        if problem:
            broken.append(BrokenPlugin(ep.name, ep.value, problem))
        elif ep.name not in modes:
            modes[ep.name] = obj
    return dict(sorted(modes.items())), broken
