"""Starts executor replicas cheaply for the crash tests: imports everything once, then forks.

Reads ``<instance> <log path>`` lines on stdin; for each, forks a child that runs the
executor service as that consumer (its output going to the log file) and answers the
child's pid on stdout. Children die with this process (PR_SET_PDEATHSIG); this process
exits when stdin closes.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys

from services.executor.service import ExecutorService
from shared.service import run_service


def spawn(instance: str, log_path: str) -> int:
    pid = os.fork()
    if pid:
        return pid
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        with contextlib.suppress(Exception):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        run_service(ExecutorService, ["--instance", instance])
    finally:
        os._exit(0)


def main() -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    for line in sys.stdin:
        instance, _, log_path = line.strip().partition(" ")
        if not instance:
            continue
        print(spawn(instance, log_path), flush=True)


if __name__ == "__main__":
    main()
