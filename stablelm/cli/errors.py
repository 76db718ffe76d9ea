"""What a failed command prints and the exit status it returns: one line on stderr, no traceback.

Exit statuses: 0 success, 1 a model or generation error, 2 a usage error (argparse's own convention),
130 interrupted by Ctrl-C (the shell's 128 + SIGINT).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import traceback
import warnings
from collections.abc import Iterator
from typing import NoReturn, TextIO

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

# Errors whose message is written for the user (a missing model, a damaged file, a value out of range):
# their message alone is shown. Any other exception is a bug, shown with its type and a pointer to --debug.
_USER_ERRORS = (OSError, ValueError, ImportError)


# What `import_start_up` imports: torch and the libraries every model command uses.
START_UP_MODULES = ("torch", "safetensors.torch", "tokenizers", "jinja2")


def import_start_up(modules: tuple[str, ...] = START_UP_MODULES) -> None:
    """Import `modules` with Ctrl-C ending the process at once, status 130 (no traceback).

    Python raises KeyboardInterrupt wherever the signal lands, and inside torch's import (~1.5 s, several
    seconds on a busy machine) that goes wrong: in a pybind11 callback it aborts the process ("terminate
    called after throwing ... KeyboardInterrupt", status -6); some of torch's import code swallows it, so
    the command goes on as if nothing happened; and in code compiled by exec (dataclasses, namedtuples)
    CPython marks it unhandled even once caught, killing the process by SIGINT on its way out. Nothing is
    written while importing, so nothing is lost by ending there and then. Outside the main thread (where
    signal handlers cannot be set), or where SIGINT is not Python's own (ignored in a background job,
    say), the modules are simply imported."""
    # torch's CPU wheels do not depend on numpy, and importing torch without it warns ("Failed to
    # initialize NumPy"); no command uses numpy, so that warning is noise on every command's stderr.
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        for name in modules:
            __import__(name)
        return

    def leave(signum: int, frame: object) -> None:
        with contextlib.suppress(OSError, ValueError):
            os.write(2, b"\n")
        os._exit(EXIT_INTERRUPTED)

    previous = signal.signal(signal.SIGINT, leave)
    try:
        for name in modules:
            __import__(name)
    finally:
        signal.signal(signal.SIGINT, previous)


def forget_interrupts() -> None:
    """Let the process end with the status the command returns, after a Ctrl-C it has handled.

    CPython (3.8 and later) remembers a KeyboardInterrupt that left code run by `exec` of a string
    (dataclasses, namedtuples and other libraries build functions that way), even once it is caught; a
    process started as `python -m stablelm` (or `-c`) then kills itself by SIGINT on its way out instead
    of exiting with the status returned (130, or 0 after a chat that went on). Evaluating a string resets
    that memory: nothing else does."""
    exec("")  # noqa: S102 - resets CPython's record of an unhandled KeyboardInterrupt


class CliError(Exception):
    """A failure to report as one line; `status` is the exit status."""

    status = EXIT_ERROR


class UsageError(CliError):
    """The command line asked for something that cannot be done (an empty prompt, no model)."""

    status = EXIT_USAGE


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block), prefixed `stablelm: error:` like every other
    error, that points at the command's --help."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"stablelm: error: {message} (see '{self.prog} --help')\n")


def one_line(text: str) -> str:
    """`text` with its whitespace runs (newlines included) collapsed, so a message stays on one line."""
    return " ".join(text.split())


def report(err: BaseException, *, debug: bool, stream: TextIO | None = None) -> int:
    """Print `err` as one line (after its traceback with `debug`); return the exit status it maps to."""
    stream = stream or sys.stderr
    if debug:
        traceback.print_exception(err, file=stream)
    if isinstance(err, KeyboardInterrupt):
        print(file=stream)
        return EXIT_INTERRUPTED
    if isinstance(err, CliError):
        print(f"stablelm: error: {one_line(str(err))}", file=stream)
        return err.status
    message = one_line(str(err)) or type(err).__name__
    if not isinstance(err, _USER_ERRORS) and not debug:
        message = f"{type(err).__name__}: {message} (run with --debug for the traceback)"
    print(f"stablelm: error: {message}", file=stream)
    return EXIT_ERROR


def silence_broken_pipe() -> int:
    """After stdout's reader went away (`stablelm generate ... | head -1`): stop writing there and end
    quietly with success, as the reader has what it wanted (the final flush goes to /dev/null)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no stdout file to redirect (an in-memory one, say)
        pass
    return EXIT_OK


def show_warning_line(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    """`warnings.showwarning` for the command line: `stablelm: warning: ...` on one line of stderr."""
    del category, filename, lineno, line
    print(f"stablelm: warning: {one_line(str(message))}", file=file or sys.stderr)


@contextlib.contextmanager
def warnings_as_lines() -> Iterator[None]:
    """A context in which every warning prints as one line on stderr."""
    with warnings.catch_warnings():
        warnings.showwarning = show_warning_line
        yield
