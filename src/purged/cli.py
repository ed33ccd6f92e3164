"""The `purged` command: the daemon by default (drop-in flags), or a subcommand for operators."""

from __future__ import annotations

import asyncio
import logging
import os
import sys

from purged.config import ConfigError, parse_flags
from purged.logs import setup_logging

SUBCOMMANDS = ("send", "offsets", "status", "check")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `purged` console script."""
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in SUBCOMMANDS:
        from purged.tools import run_tool

        return run_tool(args[0], args[1:])
    return run_daemon(args, hard_exit=argv is None)


def run_daemon(args: list[str], hard_exit: bool = False) -> int:
    """Parse the daemon's flags and run it; exit status 2 for a bad command line or config."""
    setup_logging()
    try:
        config = parse_flags(args)
    except ConfigError as error:
        print(f"purged: {error}", file=sys.stderr)
        print("purged: see 'purged -h' for the flags", file=sys.stderr)
        return 2
    logging.getLogger().setLevel(config.log_level.upper())
    from purged.daemon import serve

    try:
        code = _run(serve(config))
    except ConfigError as error:
        print(f"purged: {error}", file=sys.stderr)
        code = 2
    except Exception:
        logging.getLogger("purged").exception("purged: internal error; exiting")
        code = 1
    if hard_exit:
        # Offsets are committed and the consumer closed by now (or deliberately not, after
        # an error): do not let a library destructor wait for an unreachable broker.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _run(main: object) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency, but a fallback is cheap
        return asyncio.run(main)  # type: ignore[arg-type]
    return uvloop.run(main)  # type: ignore[arg-type]
