"""The `phi3-jax` command. Each concern registers its own subcommands from its own module."""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that define `register(subparsers)`; each adds subcommands with set_defaults(func=...).
COMMAND_MODULES = (
    "phi3_jax.demo",
    "phi3_jax.generate_cli",
    "convert.cli",
    "phi3_jax.train.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="phi3-jax", description="Phi-3 family language models in JAX.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (FileNotFoundError, ValueError, OSError) as e:
        # Bad input: one clear line, not a traceback. Bugs (other exceptions) keep theirs.
        print(f"phi3-jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
