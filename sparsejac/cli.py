"""The command line: ``sparsejac demo`` (also plain ``python -m sparsejac``)."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparsejac", description="Exact sparse Jacobians of einsum expressions."
    )
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("demo", help="check small cases against torch, then build large ones")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in (None, "demo"):
        from .demo import main as demo

        return demo()
    return 2


if __name__ == "__main__":
    sys.exit(main())
