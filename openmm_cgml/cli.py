"""The ``cgml`` command line. Each sub-command lives in the module that does the work;
that module exposes ``add_cli(subparsers)`` which registers its parser and sets
``func``. Modules are imported only when listed here, so ``cgml --help`` stays fast."""
from __future__ import annotations

import argparse
import importlib
import sys

# sub-command modules, in pipeline order (topology -> data -> models -> evaluation)
COMMAND_MODULES = [
    "openmm_cgml.generate",
    "openmm_cgml.train",
    "openmm_cgml.export",
    "openmm_cgml.evaluate",
    "openmm_cgml.demo",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cgml",
        description="Learned time-integrated coarse-grained MD for OpenMM.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).add_cli(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
