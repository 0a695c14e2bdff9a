from __future__ import annotations

import pytest

from tunneld.testbed import is_root, testbed


def pytest_collection_modifyitems(config, items):
    if is_root():
        return
    skip = pytest.mark.skip(reason="needs root: creates network namespaces, veth pairs and TAP/TUN devices")
    for item in items:
        if "netns" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def hosts():
    """Two namespace hosts (A, B) joined by veth; removed afterwards, whatever happens."""
    with testbed() as pair:
        yield pair


def pytest_terminal_summary(terminalreporter):
    """Show measurements tests record with ``record_property("report", line)`` (e.g. the unit's exposure)."""
    for report in terminalreporter.stats.get("passed", []) + terminalreporter.stats.get("failed", []):
        for name, value in getattr(report, "user_properties", ()):
            if name == "report":
                terminalreporter.write_line(value)
