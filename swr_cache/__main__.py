"""The ``swr-cache`` command line (also ``python -m swr_cache``)."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch ``swr-cache <command> ...``; returns the exit code.

    The commands live in ``swr_cache._cli`` (argparse); ``consume-stream`` is
    routed from there to ``swr_cache._cli_stream.main``.
    """
    from ._cli import main as cli_main

    return cli_main(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
