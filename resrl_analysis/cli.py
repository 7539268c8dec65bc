"""`resrl` command line (placeholder until the subcommands land)."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    raise SystemExit("resrl: not implemented yet")
