"""The `stablelm` command (also `python -m stablelm`): generate, chat, info, bench, train, train-tokenizer.

Each subcommand is a module of this package listed in COMMANDS, with a docstring (its first line is the
command's help line, the rest the epilog of its --help), `add_arguments(parser)` and `run(args) -> int`.
The command's name is the module's, "_" read as "-" (a `train_tokenizer` module is `stablelm
train-tokenizer`). A module that sets `PASSTHROUGH = True` gets the arguments it does not define, --help
included, in `args.passthrough`. Errors become one line on stderr and an exit status (see `errors`).
"""

from __future__ import annotations

import argparse
import sys
from types import ModuleType

from . import bench, chat, generate, info, train, train_tokenizer
from .errors import (
    EXIT_USAGE,
    ArgumentParser,
    CliError,
    report,
    silence_broken_pipe,
    warnings_as_lines,
)

COMMANDS: list[ModuleType] = [generate, chat, info, bench, train, train_tokenizer]

_EPILOG = """\
Run 'stablelm COMMAND --help' for the options of a command. Without --model, commands use the bundled
demo model. Text goes to stdout, everything else to stderr. Exit status: 0 on success, 1 on a model or
generation error, 2 on a usage error, 130 when interrupted."""

__all__ = ["COMMANDS", "CliError", "build_parser", "command_name", "main"]


def command_name(module: ModuleType) -> str:
    """The subcommand a module of COMMANDS provides: its name, with "_" read as "-"."""
    return module.__name__.rpartition(".")[2].replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    """The parser of the whole command, with one subparser per module of COMMANDS."""
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
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for module in COMMANDS:
        summary, _, details = (module.__doc__ or "").strip().partition("\n")
        passthrough = getattr(module, "PASSTHROUGH", False)
        subparser = commands.add_parser(
            command_name(module),
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
    """Run the command line `argv` (default: `sys.argv[1:]`); return the exit status."""
    parser = build_parser()
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
    with warnings_as_lines():
        try:
            return args.run(args)
        except BrokenPipeError:
            return silence_broken_pipe()
        except SystemExit as exit:
            return _status(exit)
        except (Exception, KeyboardInterrupt) as err:
            return report(err, debug=debug)


def _status(exit: SystemExit) -> int:
    code = exit.code
    if code is None or isinstance(code, int):
        return code or 0
    print(code, file=sys.stderr)
    return 1
