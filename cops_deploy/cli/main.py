"""The ``cops`` command: one sub-command per module ``cops_deploy/cli/*_cmd.py``.

Each such module defines ``add_parser(subparsers) -> argparse.ArgumentParser`` and sets
``func=`` (a callable taking the parsed namespace and returning an exit status) as the parser's
default. Modules import heavy packages (torch) inside their ``func`` only, so ``cops --help``
stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence

import cops_deploy.cli as cli_pkg
from cops_deploy.errors import CopsError
from cops_deploy.extras import BUILD_INSTALL, missing_build_packages, require_build
from cops_deploy.version import __version__


def build_parser() -> argparse.ArgumentParser:
    """The ``cops`` argument parser with every discovered sub-command."""
    parser = argparse.ArgumentParser(
        prog="cops", description="CoPS zero-shot anomaly detection: predict, data, train, eval."
    )
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(cli_pkg.__path__), key=lambda m: m.name):
        if info.name.endswith("_cmd"):
            module = importlib.import_module(f"cops_deploy.cli.{info.name}")
            command = module.add_parser(sub)
            # NEEDS_BUILD: the command runs PyTorch (train, eval, demo); checked before it runs so
            # that a runtime-only install says which extra to add instead of a traceback.
            command.set_defaults(needs_build=getattr(module, "NEEDS_BUILD", False))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``cops``; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        if args.needs_build:
            require_build(f"cops {args.command}")
        return int(args.func(args) or 0)
    except CopsError as exc:
        print(f"cops {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        # A build-side package imported by a command that is not marked NEEDS_BUILD (or by one
        # of its options): the same one-line hint, never a traceback.
        if (exc.name or "").split(".")[0] not in missing_build_packages():
            raise
        print(f"cops {args.command}: error: {exc}. Fix: {BUILD_INSTALL}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
