"""The `phi3-jax` command. Each concern registers its own subcommands from its own module."""

from __future__ import annotations

import argparse
import importlib
import sys

from phi3_jax import interrupts

# Modules that define `register(subparsers)`; each adds subcommands with set_defaults(func=...).
COMMAND_MODULES = (
    "phi3_jax.demo",
    "phi3_jax.generate_cli",
    "phi3_jax.server.cli",
    "phi3_jax.score_cli",
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
    # Handled for the whole run, so that a second Ctrl-C cannot land between the first one's
    # cleanup and its exit status. Run as the process (no argv given), a command stopped by a
    # signal ignores later ones while it exits.
    owns_process = argv is None
    with interrupts.handled():
        try:
            return int(args.func(args) or 0)
        except (KeyboardInterrupt, interrupts.Terminated) as e:
            if owns_process:
                interrupts.ignore_further()
            if isinstance(e, interrupts.Terminated):
                raise
            print("interrupted", file=sys.stderr)
            return 130
        except (FileNotFoundError, ValueError, OSError) as e:
            # Bad input: one clear line, not a traceback. Bugs (other exceptions) keep theirs.
            print(f"phi3-jax {args.command}: error: {e}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
