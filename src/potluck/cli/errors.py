"""How ``potluck`` ends on a mistake: one line on stderr (what was wrong, what to do) and an exit code.

Exit codes: 2 for usage errors (the command line itself is wrong), 1 for runtime errors (the swarm, the network,
the checkpoint), 130 for Ctrl-C. A traceback is printed only with ``--log-level DEBUG``.
"""

from __future__ import annotations

import logging
import sys
import traceback

EXIT_RUNTIME = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it

logger = logging.getLogger("potluck")


class UsageError(Exception):
    """The command line is wrong (exit 2); the message says what to change."""


class CommandError(Exception):
    """The command could not do its job (exit 1); the message says what went wrong and what to try."""


def one_line(text: str) -> str:
    """Library messages often span lines (transformers, p2pd); the user gets one."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def describe(exc: BaseException) -> tuple[str, int]:
    """(message, exit code) for an exception that ended a command."""
    if isinstance(exc, UsageError):
        return one_line(str(exc)), EXIT_USAGE
    if isinstance(exc, CommandError):
        return one_line(str(exc)), EXIT_RUNTIME
    text = one_line(str(exc)) or type(exc).__name__
    # Our own error types carry messages written for users; anything else also names its type.
    from_potluck = type(exc).__module__.startswith("potluck.")
    return (text if from_potluck else f"{type(exc).__name__}: {text}"), EXIT_RUNTIME


def report(exc: BaseException, *, debug: bool, prog: str = "potluck") -> int:
    """Print the one-line error (after the traceback when ``debug``); return the exit code."""
    message, code = describe(exc)
    if debug:
        traceback.print_exception(exc, file=sys.stderr)
    hint = "" if debug or code == EXIT_USAGE else " (run with --log-level DEBUG for details)"
    print(f"{prog}: error: {message}{hint}", file=sys.stderr, flush=True)
    return code


def warn(message: str) -> None:
    """A mistake that does not stop the command: one line, before the command goes on."""
    print(f"potluck: warning: {message}", file=sys.stderr, flush=True)
