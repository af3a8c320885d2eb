"""The ``cgml`` command line. Each sub-command lives in the module that does the work;
that module exposes ``add_cli(subparsers)`` which registers its parser and sets
``func``. Modules are imported only when listed here, so ``cgml --help`` stays fast.

Errors: :func:`main` turns the errors a user can cause (a bad config value, a missing
or malformed file, an unloadable model, a failing OpenMM call, ...) into one line on
stderr, ``cgml <command>: error: <message>``, and exit status 2 (the status argparse
uses for a bad command line). Any other exception is a bug: one line
``cgml <command>: internal error: ...``, exit status 1. ``--debug`` (or the environment
variable ``CGML_DEBUG=1``) re-raises instead, with the full traceback. Ctrl-C exits
with status 130 after one line.
"""
from __future__ import annotations

import argparse
import importlib
import os
import pickle
import sys

# sub-command modules, in pipeline order (topology -> data -> models -> evaluation)
COMMAND_MODULES = [
    "openmm_cgml.generate",
    "openmm_cgml.trajectory_import",
    "openmm_cgml.training",
    "openmm_cgml.packaging",
    "openmm_cgml.evaluate",
    "openmm_cgml.demo",
]

EXIT_ERROR = 2  # a user error (as argparse's usage errors)
EXIT_INTERNAL = 1  # an unexpected exception: a bug
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C

_EPILOG = ("Errors are reported in one line (exit status 2; 1 for an internal error, 130 when "
           "interrupted); --debug (or CGML_DEBUG=1) shows the traceback instead.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cgml",
        description="Learned time-integrated coarse-grained MD for OpenMM.",
        epilog=_EPILOG,
    )
    parser.add_argument("--debug", action="store_true", help="on error, raise with the full traceback")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).add_cli(subparsers)
    # ``cgml COMMAND ... --debug`` works too (SUPPRESS: an absent flag keeps the top-level value)
    for sub in subparsers.choices.values():
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                         help="on error, raise with the full traceback")
    return parser


def _expected_errors() -> tuple[type[BaseException], ...]:
    """Exception types a user can cause with bad input (files, configs, options, models)."""
    errors: list[type[BaseException]] = [ValueError, OSError, KeyError, RuntimeError, MemoryError,
                                         pickle.UnpicklingError, EOFError]
    if "yaml" in sys.modules:
        errors.append(sys.modules["yaml"].YAMLError)
    openmm = sys.modules.get("openmm")  # imported by the commands that can raise it
    if openmm is not None and hasattr(openmm, "OpenMMException"):
        errors.append(openmm.OpenMMException)
    return tuple(errors)


def error_message(error: BaseException) -> str:
    """One line describing ``error``: its first non-empty line, at most 500 characters."""
    if isinstance(error, OSError) and error.strerror and error.filename is not None:
        text = f"{error.strerror}: {os.fsdecode(error.filename)}"
        if getattr(error, "filename2", None) is not None:
            text += f" -> {os.fsdecode(error.filename2)}"
    elif isinstance(error, KeyError) and len(error.args) == 1:
        text = f"missing entry {error.args[0]!r} (an incomplete or foreign input file?)"
    else:
        text = str(error)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    if len(text) > 500:
        text = text[:497] + "..."
    return text


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv or os.environ.get("CGML_DEBUG", "") not in ("", "0")
    command = next((a for a in argv if not a.startswith("-")), "")
    try:
        args = build_parser().parse_args(argv)
        debug = debug or bool(getattr(args, "debug", False))
        command = args.command
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"\n{_prefix(command)}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:  # noqa: BLE001 - everything else propagates (SystemExit from argparse)
        if debug:
            raise
        if isinstance(error, _expected_errors()):
            print(f"{_prefix(command)}: error: {error_message(error)}", file=sys.stderr)
            return EXIT_ERROR
        print(f"{_prefix(command)}: internal error: {type(error).__name__}: {error_message(error)} "
              "(rerun with --debug for the traceback, and please report it)", file=sys.stderr)
        return EXIT_INTERNAL


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _bounded_int(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _bounded_int(text, 0)


def _bounded_int(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
    return value


def _prefix(command: str) -> str:
    """``cgml <command>``, with the rank under a multi-process (torchrun) launch."""
    prefix = f"cgml {command}".rstrip()
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        prefix += f" [rank {os.environ.get('RANK', '?')}]"
    return prefix


if __name__ == "__main__":
    sys.exit(main())
