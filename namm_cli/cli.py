"""The `namm` command line. Each subcommand lives in its own module; this file only wires them."""
from __future__ import annotations

import argparse
import logging
import sys

from . import cmd_eval, cmd_evolve, cmd_export, cmd_generate, cmd_import

COMMANDS = [cmd_evolve, cmd_eval, cmd_export, cmd_generate, cmd_import]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="namm",
        description="Neural Attention Memory Models: evolved KV-cache memories for Hugging Face causal LMs.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMANDS:
        module.add_parser(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return int(args.run(args) or 0)
    except (ValueError, OSError, TypeError, RuntimeError) as e:
        print(f"namm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
