"""tunneld — a userspace tunnelling daemon: TUN/TAP on one side, an encapsulation over the underlay on the other."""

import os

__version__ = "0.1.0"

# NumPy's OpenBLAS starts a worker thread when NumPy is imported, with every signal unblocked. The daemon blocks
# SIGINT/SIGTERM/SIGHUP from before it creates the interface until its handlers are in place (daemon.run), but
# a signal is delivered to any thread that does not block it: through that thread, a SIGTERM during start-up
# killed the process outright and a SIGINT raised KeyboardInterrupt in the middle of open(). tunneld never
# calls BLAS, so one thread (the main one) is all OpenBLAS needs; set before anything imports NumPy.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
