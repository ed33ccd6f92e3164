"""Operator subcommands of `purged`: send, offsets, status, check."""

from __future__ import annotations

import sys


def run_tool(name: str, args: list[str]) -> int:
    """Run subcommand `name` with its arguments; return the exit status."""
    print(f"purged {name}: not implemented yet", file=sys.stderr)
    return 2
