"""The `stablelm` command (also `python -m stablelm`): generate, chat, serve, info, bench, train, train-tokenizer.

Each subcommand is a module of this package named in COMMAND_MODULES, with a docstring (its first line is
the command's help line, the rest the epilog of its --help), `add_arguments(parser)` and `run(args) -> int`.
The command's name is the module's, "_" read as "-" (a `train_tokenizer` module is `stablelm
train-tokenizer`). A module that sets `PASSTHROUGH = True` gets the arguments it does not define, --help
included, in `args.passthrough`. Errors become one line on stderr and an exit status (see `errors`).

Only the module of the command being run is imported, and a module imports torch in its `run`, not at
its top: `stablelm --help`, `--version` and `stablelm COMMAND --help` answer without loading torch (the
other commands' help lines are read from their docstrings, without importing them). Every command takes
`--threads` (see `threads`) and `--debug`, from the parent parser all subcommands share.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from types import ModuleType
from typing import Any

from .errors import (
    EXIT_USAGE,
    ArgumentParser,
    CliError,
    UsageError,
    forget_interrupts,
    import_start_up,
    report,
    silence_broken_pipe,
    warnings_as_lines,
)

COMMAND_MODULES = ("generate", "chat", "serve", "info", "bench", "train", "train_tokenizer")

_EPILOG = """\
Run 'stablelm COMMAND --help' for the options of a command. Without --model, commands use the bundled
demo model. Text goes to stdout, everything else to stderr. Exit status: 0 on success, 1 on a model or
generation error, 2 on a usage error, 130 when interrupted."""

_THREADS_HELP = (
    "CPU threads for torch and the kernels: a positive integer, or auto (the default: the usable cores "
    "minus those other processes keep busy at start-up); also read from $STABLELM_THREADS"
)

__all__ = ["COMMANDS", "COMMAND_MODULES", "CliError", "build_parser", "command_name", "main"]


def __getattr__(name: str) -> Any:
    """`COMMANDS`: the command modules, imported when first asked for (main imports only the one it runs)."""
    if name == "COMMANDS":
        return [_module(module_name) for module_name in COMMAND_MODULES]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def command_name(module: ModuleType | str) -> str:
    """The subcommand a command module (or its name) provides: its name, with "_" read as "-"."""
    name = module if isinstance(module, str) else module.__name__
    return name.rpartition(".")[2].replace("_", "-")


def _module(module_name: str) -> ModuleType:
    return importlib.import_module(f"{__name__}.{module_name}")


def _docstring(module_name: str) -> str:
    """A command module's docstring, read from its source when the module is not imported yet."""
    import ast
    import importlib.util

    full = f"{__name__}.{module_name}"
    if full in sys.modules:
        return sys.modules[full].__doc__ or ""
    spec = importlib.util.find_spec(full)
    if spec is None or spec.origin is None:
        return ""
    with open(spec.origin, encoding="utf-8") as source:
        return ast.get_docstring(ast.parse(source.read()), clean=False) or ""


def _threads_setting(text: str) -> int | None:
    """argparse `type` of --threads: a positive integer, or None for auto."""
    from ..threads import parse_threads

    try:
        return parse_threads(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {text!r}") from None


def build_parser(only: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser of the whole command, with one subparser per command module.

    With `only` (command names), only those commands' modules are imported and given their options; the
    other subparsers are only names and help lines (enough for `stablelm --help`). Default: all.
    """
    from .. import __version__

    parser = ArgumentParser(
        prog="stablelm",
        description="Run StableLM models from the terminal.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"stablelm {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    common.add_argument("--threads", type=_threads_setting, metavar="N|auto", help=_THREADS_HELP)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for module_name in COMMAND_MODULES:
        name = command_name(module_name)
        summary, _, details = _docstring(module_name).strip().partition("\n")
        if only is not None and name not in only:
            commands.add_parser(name, help=summary, add_help=False)
            continue
        module = _module(module_name)
        passthrough = getattr(module, "PASSTHROUGH", False)
        subparser = commands.add_parser(
            name,
            help=summary,
            description=summary,
            epilog=details.strip() or None,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            parents=[common],
            add_help=not passthrough,
        )
        module.add_arguments(subparser)
        subparser.set_defaults(run=module.run, passthrough_allowed=passthrough, command_parser=subparser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line `argv` (default: `sys.argv[1:]`); return the exit status.

    Ctrl-C at any point (torch still loading included) ends with status 130 and no traceback; a closed
    stdout (`stablelm generate ... | head -1`) ends quietly with status 0.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    try:
        return _main(argv)
    except BrokenPipeError:
        return silence_broken_pipe()
    except KeyboardInterrupt as err:
        return report(err, debug=debug)
    finally:
        forget_interrupts()  # the status returned is the one the process exits with


def _main(argv: list[str]) -> int:
    from .. import threads

    sample = threads.CpuSample.now()  # the other processes' load, measured across torch's import
    threads.quiet_openmp_waits()
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    known = {command_name(name) for name in COMMAND_MODULES}
    parser = build_parser([command] if command in known else [])
    try:
        args, extra = parser.parse_known_args(argv)
        if args.command is None:
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        if extra and not args.passthrough_allowed:
            args.command_parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as exit:  # --help, --version, or a usage error argparse has printed
        return _status(exit)
    args.passthrough = extra
    debug = getattr(args, "debug", False)
    import_start_up()  # torch's import is no place for a KeyboardInterrupt
    restore = threads.torch_threads_if_loaded()
    with warnings_as_lines():
        try:
            args.threads_used, args.threads_note = _apply_threads(args.threads, sample)
            return args.run(args)
        except BrokenPipeError:
            return silence_broken_pipe()
        except SystemExit as exit:
            return _status(exit)
        except (Exception, KeyboardInterrupt) as err:
            return report(err, debug=debug)
        finally:
            if restore is not None:  # main called in a process that already used torch: leave it as it was
                threads.set_threads(restore)


OVERSUBSCRIBED = 4  # a thread count past this many times the usable cores is refused (past 1x: a note)


def _apply_threads(flag: int | None, sample: Any) -> tuple[int, str]:
    """Set torch's thread count from --threads, else $STABLELM_THREADS, else auto; return the count and
    a line for --verbose saying where it came from."""
    from .. import threads

    setting, origin = flag, "--threads"
    if setting is None and os.environ.get(threads.THREADS_ENV, "").strip():
        try:
            setting = threads.parse_threads(os.environ[threads.THREADS_ENV], name=threads.THREADS_ENV)
        except ValueError as err:
            raise UsageError(str(err)) from None
        origin = threads.THREADS_ENV
    if setting is None:
        count, why = threads.auto_threads_detail(sample)
        note = f"threads: {count} (auto: {why})"
    else:
        note = f"threads: {setting} ({origin})"
        cores = threads.usable_cores()
        if setting > OVERSUBSCRIBED * cores:  # 1000 threads on 2 cores ran for minutes, unexplained
            raise UsageError(
                f"{origin} {setting} is far more than the {cores} cores this process may use: threads beyond "
                f"the cores only wait for each other; pass at most {cores} (or 'auto')"
            )
        if setting > cores:
            print(
                f"stablelm: note: {origin} {setting} is more than the {cores} cores this process may use; "
                "the extra threads only wait for each other",
                file=sys.stderr,
            )
    count = threads.set_threads(setting if setting is not None else count)
    os.environ.setdefault("RAYON_NUM_THREADS", str(count))  # the tokenizers library's pool, made later
    return count, note


def _status(exit: SystemExit) -> int:
    code = exit.code
    if code is None or isinstance(code, int):
        return code or 0
    print(code, file=sys.stderr)
    return 1
