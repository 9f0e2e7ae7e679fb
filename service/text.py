"""Text from outside the service (Ray job logs, exception messages) made fit for a database column, a
queue reason and a terminal: terminal escape codes removed, one line where one line is promised, and
bounded, so that a colourful 20 kB log never becomes an experiment's `error`."""

from __future__ import annotations

import re

# CSI sequences (colours, cursor moves), OSC sequences (titles, links) and two-character escapes.
_ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])")
# Control characters other than tab, newline and carriage return (kept: they separate lines).
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def strip_ansi(text: str) -> str:
    """`text` without terminal escape sequences and stray control characters."""
    return _CONTROL.sub("", _ANSI.sub("", text))


def shorten(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters, the cut marked with '...'."""
    return text if len(text) <= limit else text[: max(0, limit - 3)].rstrip() + "..."


def one_line(text: str, limit: int) -> str:
    """`text` as one clean line of at most `limit` characters (whitespace runs become one space)."""
    return shorten(" ".join(strip_ansi(text).split()), limit)


def clean_lines(text: str) -> list[str]:
    """The non-blank lines of `text`, escape codes removed and trailing space trimmed."""
    return [line.rstrip() for line in strip_ansi(text).splitlines() if line.strip()]


def tail(lines: list[str], *, max_lines: int, max_chars: int) -> str:
    """The last `max_lines` of `lines`, fewer if they would exceed `max_chars` in all."""
    kept: list[str] = []
    size = 0
    for line in reversed(lines[-max_lines:]):
        line = shorten(line, max_chars)
        if kept and size + len(line) + 1 > max_chars:
            break
        kept.append(line)
        size += len(line) + 1
    return "\n".join(reversed(kept))
