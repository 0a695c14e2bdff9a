"""The tunnel's configuration, in three parts, and the encrypted mode's keys:

  schema.py   the frozen ``TunnelConfig``, its defaults and bounds (MAX_PEERS, ...), ``ConfigError``, EX_CONFIG;
  checks.py   the rules, one function each (``check_peer``, ``check_name``, ``check_route``, ...): the one place a
              rule is stated, called by the file, the command line, the control socket and the registry alike;
  loading.py  the TOML file (``load_file``, ``ConfigFileError``, FILE_KEYS) and ``validate``, which checks the
              file and the flags merged into one ``TunnelConfig``;
  wireguard.py  the WireGuard interface and [[peer]] keys (key files refused unless owner-only), as the model
              the userspace API (tunneld/control/wgapi.py) edits; not yet wired to a mode.

Import from the module that holds the name.
"""
