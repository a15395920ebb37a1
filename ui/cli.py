"""The ``pigeon`` command line."""

from __future__ import annotations

import argparse
import sys

from pigeon.protocol import PigeonError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pigeon", description="Peer-to-peer, end-to-end encrypted messaging."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("demo", help="show a conversation between two identities, end to end")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "demo":
            from .demo import run_demo

            return run_demo()
    except PigeonError as error:
        print(f"pigeon: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
