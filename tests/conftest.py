"""The suite's tiers, deadlines and shared fixtures.

Every test gets one tier marker here, from its file, its fixtures or its own marker, so that no test file has
to repeat it (CPython's regrtest resources, pytest's markers):

  unit     pure: no process, no root (the default)
  process  starts processes or servers of its own, no root (PROCESS_FILES, PROCESS_TESTS)
  netns    needs root: network namespaces, veth, TAP/TUN (its own ``netns`` marker, or the ``hosts`` fixture)
  e2e      a booted container (systemd-nspawn) or an etcd cluster (E2E_FILES); needs root, so it is netns too
  soak     pure, but long (a million datagrams through an engine): its own ``soak`` marker. No root needed, yet it
           is marked netns too, so that ``-m "not netns"`` (make test-unit, the pre-commit run) stays fast

``make test-unit`` is ``-m "not netns"``: unit and process, no root. Tests marked ``serial`` measure time;
``make test`` runs them alone after the parallel part (tests/suite.py). Each tier has a deadline
(pytest-timeout: TIMEOUTS below, pyproject.toml's ``timeout`` for unit), which a test's own
``@pytest.mark.timeout(N)`` overrides.
"""

from __future__ import annotations

import contextlib
import os

import pytest

from tunneld.testbed import Host, is_root, sh, testbed

# Files whose tests start processes (the installed tunneld, a forked worker, a server) without root.
PROCESS_FILES = frozenset({
    "test_cli.py", "test_hardening.py", "test_metrics_server.py", "test_plugins.py",
    "test_signals.py", "test_unit_file.py", "test_workers.py",
})
# Tests that start processes in files that are otherwise pure.
PROCESS_TESTS = frozenset({
    "test_config.py::test_a_bad_file_at_startup_exits_78_without_traceback",
    "test_control.py::test_another_uid_than_the_daemons_is_refused_without_reaching_the_handler",
    "test_control.py::test_a_directory_that_cannot_be_written_is_one_line_naming_the_flag",
    "test_metrics.py::test_promtool_accepts_the_whole_exposition_with_default_collectors",
    "test_metrics.py::test_cli_rejects_a_bad_listen_value_in_one_line",
    "test_registry.py::test_registry_table_in_a_file",
})
# Tests that bound a duration in files others own (elsewhere a test says @pytest.mark.serial itself).
SERIAL_TESTS = frozenset({
    "test_control.py::test_a_stalled_client_is_closed_after_the_timeout_and_others_are_served_meanwhile",
    "test_control.py::test_beyond_max_clients_a_connection_is_closed_at_once",
    "test_metrics_server.py::test_a_slowloris_request_is_closed_after_the_read_timeout_however_it_trickles",
})
E2E_FILES = frozenset({"test_systemd_e2e.py", "test_registry_netns.py"})
NETNS_FIXTURES = frozenset({"hosts", "hosts3", "hosts4", "module_hosts"})

# Seconds a test may take, by tier (unit: pyproject.toml's timeout). Several times what each takes on a loaded
# 2-CPU machine; e2e's covers a first run that debootstraps the containers' base (tests/nspawn.py).
TIMEOUTS = {"process": 180, "netns": 240, "e2e": 1500, "soak": 900}


def name(item: pytest.Item) -> str:
    """FILE::FUNCTION, without parameters."""
    return f"{item.path.name}::{item.name.split('[')[0]}"


def tier(item: pytest.Item) -> str:
    filename = item.path.name
    if filename in E2E_FILES or item.get_closest_marker("e2e"):
        return "e2e"
    if item.get_closest_marker("soak"):
        return "soak"
    if item.get_closest_marker("netns") or NETNS_FIXTURES & set(getattr(item, "fixturenames", ())):
        return "netns"
    if filename in PROCESS_FILES or name(item) in PROCESS_TESTS:
        return "process"
    return "unit"


# The order tests start in: the longest kinds first, so that in a parallel run (tests/suite.py) an nspawn boot or
# an etcd cluster does not begin when everything else is done. Within a tier, the files' own order.
ORDER = ("e2e", "soak", "netns", "process", "unit")
# The longest files of their tiers, longest first: the WireGuard interop file holds a 138 s rekey test.
FIRST = ("test_systemd_e2e.py", "test_wg_interop_daemon_netns.py", "test_registry_netns.py")


def pytest_collection_modifyitems(config, items):
    root = is_root()
    skip = pytest.mark.skip(reason="needs root: creates network namespaces, veth pairs and TAP/TUN devices")
    levels = {item.nodeid: tier(item) for item in items}
    items.sort(key=lambda item: (ORDER.index(levels[item.nodeid]),
                                 FIRST.index(item.path.name) if item.path.name in FIRST else len(FIRST)))
    for item in items:
        level = levels[item.nodeid]
        item.add_marker(level)
        if name(item) in SERIAL_TESTS:
            item.add_marker("serial")
        if level == "e2e":
            item.add_marker("netns")  # needs root as netns does: `-m "not netns"` stays the no-root tier
        if level == "soak":
            item.add_marker("netns")  # long: `-m "not netns"` stays the fast tier (not skipped without root)
        if level in TIMEOUTS and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(TIMEOUTS[level]))
        if level in ("netns", "e2e") and not root:
            item.add_marker(skip)


@pytest.fixture
def hosts():
    """Two namespace hosts (A, B) joined by veth; removed afterwards, whatever happens."""
    with testbed() as pair:
        yield pair


# What a test may change in a host and leave behind: its interfaces, addresses, routes and static neighbours.
# (Not the sysctls: a test that sets one asks for ``hosts``, a fresh pair.)
STATE = "link show\naddress show\nroute show table all\nneigh show nud permanent\n"


def host_state(host: Host) -> tuple[str, str, list[str]]:
    ipv4_and_links = sh("ip", "-netns", host.name, "-o", "-batch", "-", input=STATE).stdout
    ipv6_routes = sh("ip", "-netns", host.name, "-6", "-o", "route", "show", "table", "all").stdout
    sockets = sorted(os.listdir(host.runtime_dir)) if os.path.isdir(host.runtime_dir) else []
    return ipv4_and_links, ipv6_routes, sockets


class SharedPair:
    """One module's testbed, kept from test to test while each leaves the hosts as it found them: after a test
    its processes are killed, and if anything in STATE differs from the fresh pair's, the pair is replaced."""

    def __init__(self) -> None:
        self.stack: contextlib.ExitStack | None = None
        self.pair: tuple[Host, Host] | None = None
        self.fresh: list[tuple] = []

    def get(self) -> tuple[Host, Host]:
        if self.pair is None:
            self.stack = contextlib.ExitStack()
            self.pair = self.stack.enter_context(testbed())
            self.fresh = [host_state(h) for h in self.pair]
        return self.pair

    def after_test(self) -> None:
        assert self.pair is not None
        for h in self.pair:
            h.kill_all()
        if [host_state(h) for h in self.pair] != self.fresh:
            self.close()

    def close(self) -> None:
        if self.stack is not None:
            self.stack.close()
        self.stack = self.pair = None


@pytest.fixture(scope="module")
def _shared_pair():
    shared = SharedPair()
    try:
        yield shared
    finally:
        shared.close()


@pytest.fixture
def module_hosts(_shared_pair):
    """Two namespace hosts (A, B), as ``hosts`` gives, shared by the module's tests that ask for them: for tests
    that change no sysctl and no device feature (ethtool, as kernel_vxlan() and like_a_wire() do). Whatever
    else a test leaves (a device, a route, an address, a process) is undone by replacing the pair."""
    pair = _shared_pair.get()
    try:
        yield pair
    finally:
        _shared_pair.after_test()


def pytest_terminal_summary(terminalreporter):
    """Show measurements tests record with ``record_property("report", line)`` (e.g. the unit's exposure)."""
    for report in terminalreporter.stats.get("passed", []) + terminalreporter.stats.get("failed", []):
        for name, value in getattr(report, "user_properties", ()):
            if name == "report":
                terminalreporter.write_line(value)
