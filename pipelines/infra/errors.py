"""Which failures retrying cannot fix, and how to say what they are.

A full disk, a read-only data root or a permission error fails the same way on every
try: retrying it for minutes (as the network retry policy would) only hides the cause.
``deterministic_cause`` recognises them in an exception chain: an ``OSError`` with
its errno, or the words DuckDB or Arrow put in their own errors, and returns one line
naming the cause and the path. GDAL's "TIFFAppendToStrip: Write error" says nothing
of a disk: the writers (``pipelines.infra.storage.raise_if_full``) turn a failed write on a
full file system into ``OSError(ENOSPC)`` naming the file.

``transient_cause`` is the other side: the faults a later try may not meet (a
connection refused, reset or timed out, an HTTP 429 or 5xx, a dask worker lost). The
assets retry only those (``assets.resources.fail_fast``); any other error fails the step
at once, since it would fail the same way on every try.
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
    """The first line of an error's message (its type's name when it has none), with
    DuckDB's "Did you mean ..." hint from a later line when there is one."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    hint = next((line for line in lines[1:] if line.startswith(("Did you mean", "Candidate"))), None)  # fmt: skip
    return lines[0] + (f" ({hint})" if hint else "")


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


class MissingInputError(RuntimeError):
    """A stage's input (another stage's output for this or the previous period) is not
    there yet; the message names it and what to materialise first."""


#: errno values of network faults that a later try may not meet.
TRANSIENT_ERRNOS = {
    errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.ETIMEDOUT,
    errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN, errno.EPIPE, errno.EAGAIN,
}  # fmt: skip
#: Exception type names (any module) of network and cluster faults: requests', urllib3's,
#: http.client's, aiohttp's and dask's own.
TRANSIENT_TYPES = {
    "ConnectionError", "ConnectTimeout", "ReadTimeout", "Timeout", "ChunkedEncodingError",
    "ProtocolError", "NewConnectionError", "MaxRetryError", "ReadTimeoutError",
    "RemoteDisconnected", "IncompleteRead", "ClientConnectorError", "ServerDisconnectedError",
    "CommClosedError", "KilledWorker", "TimeoutError",
}  # fmt: skip
#: Words of a message (GDAL's curl errors, an HTTP status) that name a transient fault.
TRANSIENT_WORDS = (
    "http response code: 429", "http response code: 500", "http response code: 502",
    "http response code: 503", "http response code: 504", "too many requests",
    "timed out", "timeout was reached", "connection reset", "connection refused",
    "could not resolve host", "temporary failure in name resolution", "curl error",
    "status 429", "status 500", "status 502", "status 503", "status 504",
    "503 server error", "502 server error", "504 server error", "500 server error",
)  # fmt: skip


def transient_cause(e: BaseException) -> str | None:
    """One line naming a fault a later try may not meet (network, HTTP 429/5xx, a lost
    dask worker), or None: then retrying would fail the same way."""
    for x in _chain(e):
        if isinstance(x, OSError) and x.errno in TRANSIENT_ERRNOS:
            return f"{CAUSES.get(x.errno, errno.errorcode.get(x.errno or 0, 'network error'))}: {first_line(x)}"  # fmt: skip
        if isinstance(x, ConnectionError | TimeoutError) or type(x).__name__ in TRANSIENT_TYPES:
            return f"{type(x).__name__}: {first_line(x)}"
    for x in _chain(e):
        text = str(x).lower()
        for words in TRANSIENT_WORDS:
            if words in text:
                return first_line(x)
    return None
