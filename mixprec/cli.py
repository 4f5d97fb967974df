"""What every command line of mixprec shares: :class:`UsageError`, the one-line argparse parser, and the
SIGINT/SIGTERM handling of the commands that stop cleanly.

It imports nothing from mixprec, so that any module may raise a usage error without importing
the configuration (or, through it, the models).
"""

from __future__ import annotations

import argparse
import difflib
import signal
import threading
from contextlib import contextmanager


class UsageError(Exception):
    """Bad input from the user. The CLI prints its message as one line and exits 2."""


def did_you_mean(value, choices, flag: str) -> str:
    """The hint for ``value``, which is not one of ``choices`` of option ``flag``: the closest choices
    (difflib.get_close_matches, keeping those about as close as the closest) and the fix. A short list of
    choices is named in full; a long one (the models) is left to ``--help``.

    >>> did_you_mean("resnet81", ["resnet18", "resnet20", "vgg16", "alexnet", "googlenet", "densenet121", "x"],
    ...              "--model")
    'did you mean resnet18? (give it as --model resnet18)'
    """
    choices = [str(c) for c in choices]
    close = difflib.get_close_matches(str(value), choices, n=3, cutoff=0.6)
    ratio = [difflib.SequenceMatcher(None, str(value), c).ratio() for c in close]
    close = [c for c, r in zip(close, ratio) if r >= ratio[0] - 0.05]  # resnet81: resnet18, not resnet152 too
    if close:
        names = close[0] if len(close) == 1 else f"{', '.join(close[:-1])} or {close[-1]}"
        return f"did you mean {names}? (give it as {flag} {close[0]})"
    if len(choices) <= 6:
        return f"choose one of {', '.join(choices)}"
    return f"choose one of the {len(choices)} that --help lists"


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad option is one line on stderr (no usage dump) and exit 2, and a mistyped choice is
    answered with the closest ones (:func:`did_you_mean`) instead of every choice there is."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}{'' if '--help' in message else ' (see --help)'}\n")

    def _check_value(self, action, value):  # argparse's hook for ``choices``; its message lists them all
        if action.choices is not None and value not in action.choices:
            flag = action.option_strings[0] if action.option_strings else action.dest
            raise argparse.ArgumentError(action, f"invalid choice: {value!r}; "
                                                 f"{did_you_mean(value, action.choices, flag)}")


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
