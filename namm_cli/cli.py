"""The `namm` command line. Each subcommand lives in its own module; this file only wires them."""
from __future__ import annotations

import argparse
import logging
import sys

from . import cmd_adapt, cmd_eval, cmd_evolve, cmd_export, cmd_generate, cmd_import

COMMANDS = [cmd_evolve, cmd_eval, cmd_export, cmd_generate, cmd_import, cmd_adapt]

# Which optional dependency group (pyproject.toml) brings each module a command may import.
EXTRA_OF_MODULE = {"ray": "evolve", "mlflow": "evolve", "cma": "evolve",
                   "pyarrow": "eval", "tqdm": "eval", "matplotlib": "eval", "rapidfuzz": "eval",
                   "rouge_score": "eval", "jieba": "eval", "yaml": "eval"}


def missing_extra_message(command: str, error: ModuleNotFoundError) -> str | None:
    """One line naming the extra to install, when a command needs a module of an optional group."""
    top = (error.name or "").split(".")[0]
    extra = EXTRA_OF_MODULE.get(top)
    if extra is None:
        return None
    return f'namm {command}: error: needs the [{extra}] extra ({top} is not installed): pip install "namm[{extra}]"'


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
    except ModuleNotFoundError as e:
        message = missing_extra_message(args.command, e)
        if message is None:
            raise
        print(message, file=sys.stderr)
        return 2
    except (ValueError, OSError, TypeError, RuntimeError) as e:
        logging.getLogger("namm").debug("where it failed", exc_info=True)   # with --verbose
        print(f"namm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
