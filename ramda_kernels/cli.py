"""``ramda-kernels`` / ``python -m ramda_kernels``: one entry, one module per subcommand.

Each module in ``ramda_kernels.commands`` defines ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``; it is imported only when
its subcommand runs, so ``info`` works even where torch extensions or
optional packages are missing.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

COMMANDS = ("info", "validate", "train", "compact")
DESCRIPTION = "ramda-kernels (or python -m ramda_kernels): structured sparsity with fused RAMDA kernels"


def plain(text: str) -> str:
    """``text`` without reStructuredText literal quotes, for a terminal."""
    return text.replace("``", "").replace("`", "")


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (subcommand parsers inherit this class)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _load(name: str):
    return importlib.import_module(f"ramda_kernels.commands.{name}")


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = _Parser(prog="ramda-kernels", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = {}
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name in COMMANDS:
        try:
            mod = _load(name) if name == wanted else None
            helptext = mod.HELP if mod else _load(name).HELP
        except ModuleNotFoundError as e:
            if e.name == f"ramda_kernels.commands.{name}":
                continue  # subcommand not part of this build
            raise
        helptext = plain(helptext)
        p = sub.add_parser(name, help=helptext, description=helptext)
        if name == wanted:
            mod.add_arguments(p)
            modules[name] = mod
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(modules[args.command].run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
