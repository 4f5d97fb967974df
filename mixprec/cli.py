"""What every command line of mixprec shares: :class:`UsageError` and the one-line argparse parser.

It imports nothing from mixprec, so that any module may raise a usage error without importing
the configuration (or, through it, the models).
"""

from __future__ import annotations

import argparse


class UsageError(Exception):
    """Bad input from the user. The CLI prints its message as one line and exits 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad option is one line on stderr (no usage dump) and exit 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")
