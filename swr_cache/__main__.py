"""The ``swr-cache`` command line (also ``python -m swr_cache``)."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch ``swr-cache <command> ...``; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    commands = {"demo": "run the main job on embedded defaults and print a report"}
    if not args or args[0] in ("-h", "--help"):
        print("usage: swr-cache <command> [options]\n\ncommands:")
        for name, text in commands.items():
            print(f"  {name:<10} {text}")
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "demo":
        from ._demo import main as demo

        return demo(rest)
    print(f"swr-cache: unknown command {command!r} (try --help)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
