# tunneld — everything a fresh Debian machine needs, as root: `make demo`, `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Debian packages the tests, demo and benchmarks use: real peers, dissectors, scrapers and systemd tools; etcd for
# the registry's tests (a real 3-member cluster in namespaces; etcd-server's unit is disabled again, as openvpn's).
# wireguard-go and wireguard-tools are the real WireGuard peer (this kernel has no module); --no-install-recommends
# matters there: a Recommends would pull in a linux-image package.
APT_PACKAGES := iproute2 iputils-ping iperf3 tshark tcpdump prometheus socat procps kmod ethtool util-linux systemd systemd-container debootstrap openvpn etcd-server etcd-client wireguard-go wireguard-tools
export DEBIAN_FRONTEND := noninteractive

.PHONY: setup apt venv demo test test-unit fuzz bench bench-quick clean

setup: apt venv man-install

# openvpn is a peer for bench/, run only inside its namespaces; Debian's package enables openvpn.service (which
# starts /etc/openvpn/*.conf at boot), so when we are the ones installing it we disable that unit again.
apt:
	@if ! dpkg -s $(APT_PACKAGES) >/dev/null 2>&1; then \
		if [ "$$(id -u)" -ne 0 ]; then echo "make setup: installing $(APT_PACKAGES) needs root (apt-get)"; exit 1; fi; \
		echo "apt-get: installing $(APT_PACKAGES)"; \
		had_openvpn=$$(dpkg -s openvpn >/dev/null 2>&1 && echo yes); had_etcd=$$(dpkg -s etcd-server >/dev/null 2>&1 && echo yes); \
		apt-get update -qq && apt-get install -y -qq --no-install-recommends $(APT_PACKAGES) >/dev/null; \
		if [ -z "$$had_openvpn" ] && command -v systemctl >/dev/null; then systemctl disable --quiet openvpn.service 2>/dev/null || true; fi; \
		if [ -z "$$had_etcd" ] && command -v systemctl >/dev/null; then systemctl disable --now --quiet etcd.service 2>/dev/null || true; fi; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test,bench,man]'
	@touch $@

# tunneld(8), generated from the argument parser (docs/manpage.py with argparse-manpage, never written by hand)
# and installed where `man tunneld` looks (/usr/local/share/man, in man-db's default path). `make setup` installs
# it as root; the installed page and man-db's index are rewritten only when the page changed.
APT_PACKAGES += man-db
MAN_PAGE := build/man/tunneld.8
MANDIR ?= /usr/local/share/man/man8
MANDB ?= mandb
.PHONY: man man-install

man: venv
	@mkdir -p $(dir $(MAN_PAGE))
	$(PY) docs/manpage.py $(MAN_PAGE)

man-install: man
	@if [ "$$(id -u)" -ne 0 ] && [ ! -w "$(MANDIR)" ]; then echo "make man-install: $(MANDIR) needs root; the page is $(MAN_PAGE)"; \
	elif ! cmp -s $(MAN_PAGE) $(MANDIR)/tunneld.8; then \
		install -m 0644 -D $(MAN_PAGE) $(MANDIR)/tunneld.8 && echo "installed $(MANDIR)/tunneld.8"; \
		if command -v $(MANDB) >/dev/null; then $(MANDB) -q || true; fi; \
	fi

demo: setup
	$(PY) -m tests.demo

# The whole suite: the tests that measure time (marker `serial`) alone after the rest, which runs TEST_JOBS at a
# time (pytest-xdist); each run prints its slowest 25, and the last line adds both up (tests/suite.py).
TEST_JOBS ?= 4
test: setup
	$(PY) -m tests.suite --jobs $(TEST_JOBS)

# No root: the unit and process tiers (tests/conftest.py), about a minute.
test-unit: venv
	$(PY) -m pytest -m "not netns" -n 2

# Long fuzzing runs (tests/test_fuzz.py runs a short, derandomized one in `make test`): hypothesis with
# FUZZ_EXAMPLES random examples per target, then atheris (coverage-guided) FUZZ_SECONDS per target where it
# installs (a wheel for this Python and platform; `pip install '.[fuzz]'`).
FUZZ_EXAMPLES ?= 5000
FUZZ_SECONDS ?= 60
fuzz: venv
	TUNNELD_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q tests/test_fuzz.py
	@set -o pipefail; if $(PY) -m pip install -q --disable-pip-version-check -e '.[fuzz]' >/dev/null 2>&1 && $(PY) -c 'import atheris'; then \
		for target in decap split plan vnet; do \
			echo "atheris: $$target for $(FUZZ_SECONDS) s"; \
			$(PY) -m tests.fuzz_atheris $$target -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 2>&1 | tail -n 3 || exit 1; \
		done; \
	else echo "atheris is not installable here: hypothesis only"; fi

bench: setup
	$(PY) -m bench.run

bench-quick: setup
	$(PY) -m bench.run --quick

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
