"""The ``kvzap-sglang`` command line. Each subcommand exits 0 on success, 2 with a message on bad input."""

from __future__ import annotations

import argparse
import sys

from kvzap_sglang.models import DEFAULT_MODEL, ModelNotFoundError, resolve_model_path


class UsageError(Exception):
    """Bad input from the user: printed as ``error: ...`` with exit code 2."""


def _cmd_model_path(args: argparse.Namespace) -> int:
    print(resolve_model_path(args.model))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvzap-sglang", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    model = commands.add_parser("model", help="embedded models").add_subparsers(dest="model_command", required=True)
    path = model.add_parser("path", help="print the local Hugging Face folder of a model (converting on first use)")
    path.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"embedded name or folder (default {DEFAULT_MODEL})")
    path.set_defaults(handler=_cmd_model_path)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (UsageError, ModelNotFoundError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
