# The plugin packages here are third-party projects with their own tests, which import the plugin as installed.
# tests/test_plugins.py installs a copy and runs those tests; the project's own run must not collect them.
collect_ignore = ["tunneld-ipudp"]
