"""The plugin author's own tests: tunneld's conformance suite, run against this plugin."""

from tunneld.testing import EncapsulatorConformance
from tunneld_ipudp import IpUdp


class TestIpUdpConforms(EncapsulatorConformance):
    encapsulator = IpUdp
    options = {"session": "7"}
