"""What every command line of mixprec shares: :class:`UsageError`, the one-line argparse parser, and the
SIGINT/SIGTERM handling of the commands that stop cleanly.

It imports nothing from mixprec, so that any module may raise a usage error without importing
the configuration (or, through it, the models).
"""

from __future__ import annotations

import argparse
import signal
import threading
from contextlib import contextmanager


class UsageError(Exception):
    """Bad input from the user. The CLI prints its message as one line and exits 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad option is one line on stderr (no usage dump) and exit 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


@contextmanager
def handling_signals(handler, signums=(signal.SIGINT, signal.SIGTERM)):
    """Within the block, SIGINT and SIGTERM call ``handler(signum, frame)``; the handlers they had come back
    after it. Off the main thread, where Python cannot install signal handlers, it changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, handler) for signum in signums}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
