"""
The first steps of a worker process (C{[server] workers}), before its slow
imports (L{smtpauth_relay.worker}): it asks to be sent SIGTERM when the main
process dies (Linux's C{PR_SET_PDEATHSIG}), so that a worker never outlives
the main process holding the listening sockets; it exits at once if the main
process is already gone; and a reload (SIGHUP) meanwhile does not kill it
(it reads the configuration afterwards, and the main process passes reloads
on only once it is ready).  Only the standard library here.

Started by the main process::

    python -m smtpauth_relay.workerstart MAIN_PID --config PATH --index N ...
"""

import ctypes
import os
import runpy
import signal
import sys

PR_SET_PDEATHSIG = 1


def start(argv: list[str]) -> None:
    """
    Prepare, then run the worker with C{argv} without the main process's
    id (its first element after the program name).
    """
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (AttributeError, OSError):
        pass
    if os.getppid() != int(argv.pop(1)):
        sys.exit("smtpauth-relay worker: the main process is gone")
    runpy.run_module("smtpauth_relay.worker", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    start(sys.argv)
