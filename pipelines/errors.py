"""Which failures retrying cannot fix, and how to say what they are.

A full disk, a read-only data root or a permission error fails the same way on every
try: retrying it for minutes (as the network retry policy would) only hides the cause.
``deterministic_cause`` recognises them in an exception chain: an ``OSError`` with
its errno, or the words DuckDB or Arrow put in their own errors, and returns one line
naming the cause and the path. GDAL's "TIFFAppendToStrip: Write error" says nothing
of a disk: the writers (``pipelines.storage.raise_if_full``) turn a failed write on a
full file system into ``OSError(ENOSPC)`` naming the file.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from pathlib import Path

#: errno -> what it means, as a person would say it.
CAUSES: dict[int, str] = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


def _chain(e: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    stack: list[BaseException | None] = [e]
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        yield x
        stack.extend([x.__cause__, x.__context__])


def first_line(e: BaseException) -> str:
    """The first line of an error's message (its type's name when it has none)."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def deterministic_cause(e: BaseException, root: Path | None = None) -> str | None:
    """One line naming a cause retrying cannot fix (and the path), or None."""
    for x in _chain(e):
        if isinstance(x, OSError) and x.errno in CAUSES:
            path = x.filename or x.filename2 or root
            return f"{CAUSES[x.errno]} writing {path}" if path else CAUSES[x.errno]
    for x in _chain(e):  # the same causes in a library's own words (DuckDB, Arrow)
        text = str(x).lower()
        for cause in CAUSES.values():
            if cause in text:
                return f"{cause} ({first_line(x)})" + (f" under {root}" if root else "")
    return None
