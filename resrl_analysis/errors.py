"""The one error type of the probe side: :class:`ProbeError` (standard library only).

Its own module, so that checkpoint loading, probe-set readers, run discovery, results and the memory
plan all raise the same class without importing each other.

    >>> try:
    ...     raise ProbeError("runs/a/config.json: missing")
    ... except ValueError as e:  # a ProbeError is a ValueError
    ...     str(e)
    'runs/a/config.json: missing'
"""

from __future__ import annotations

__all__ = ["ProbeError", "one_line"]


class ProbeError(ValueError):
    """The input cannot be probed. The message is one line and names the offending path (or file:line)."""


def one_line(e: BaseException) -> str:
    """``"Type: first line of the message"``: an exception folded into a one-line error.

    >>> one_line(ValueError("bad\\nmore"))
    'ValueError: bad'
    """
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")
