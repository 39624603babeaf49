"""Where asmwatch keeps its outputs, and how it writes them without ever leaving half a file.

Every writer in the project goes through ``atomic_path``/``atomic_dir``: write to a
temporary name beside the target, then ``os.replace`` it into place. A crash or a bad
input leaves the previous result untouched, and re-running a partition overwrites it
whole.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DEFAULT_DATA_ROOT = "data"


def data_root(path: str | os.PathLike[str] | None = None) -> Path:
    """The data root: ``path``, else ``$ASMWATCH_DATA``, else ``./data`` (made absolute)."""
    raw = path if path is not None else os.environ.get("ASMWATCH_DATA", DEFAULT_DATA_ROOT)
    return Path(raw).expanduser().resolve()


_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")


class UnsafePathError(ValueError):
    """A name that would put a file outside the data root (or is not a plain name)."""


def partition_path(root: Path, table: str, region: str, period: str, suffix: str) -> Path:
    """``<root>/<table>/<region>/<period><suffix>``, refused unless it stays under ``root``.

    Region and period ids are validated by the regions file already; this is the second
    line: every part must be a plain name (letters, digits, '-', '_'), so no id from a
    partition key, a sensor or the command line can reach outside the data root.
    """
    return confined(root, table, region, f"{period}{suffix}", names=(table, region, period))


def confined(root: Path, *parts: str, names: tuple[str, ...] | None = None) -> Path:
    """``root / parts``, refused unless each name is plain and the result stays in ``root``.

    ``names``: the parts to check as plain names (default: all of them).
    """
    for value in parts if names is None else names:
        if not isinstance(value, str) or not _SAFE.match(value):
            raise UnsafePathError(
                f"{value!r} is not a plain name (letters, digits, '-', '_'): refusing to "
                f"build a path from it under the data root {root}"
            )
    path = root.joinpath(*parts)
    if not path.resolve().is_relative_to(root.resolve()):  # e.g. a symlinked folder
        raise UnsafePathError(f"{path} resolves outside the data root {root}")
    return path


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str], suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success rename it onto ``target``.

    ``suffix`` ends the temporary name (``.tmp.gpkg`` for a writer, such as GDAL's, that
    checks the file's extension).

    On any exception the temporary file is removed and ``target`` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(target.parent, target.name)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{target.name}.{os.getpid()}.", suffix=suffix, dir=target.parent
    )
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        chmod_for_umask(tmp_path)  # mkstemp makes 0600; others must be able to read
        os.replace(tmp_path, target)
    except Exception as e:
        raise_if_full(target, e)  # before the half file is removed and frees its space
        raise
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


#: A write that fails with less than this free on its file system failed for want of
#: space: libraries say so in their own words, or not at all (GDAL's "TIFFAppendToStrip:
#: Write error", or a file it cannot open afterwards).
FULL_BELOW_BYTES = 4 * 1024 * 1024


def raise_if_full(target: str | os.PathLike[str], error: BaseException) -> None:
    """Raise ``OSError(ENOSPC)`` naming ``target`` (from ``error``) if its file system
    is full now; call it where a write failed, before cleaning up."""
    import errno

    p = Path(target)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        free = shutil.disk_usage(p).free
    except OSError:
        return
    if free < FULL_BELOW_BYTES:
        raise OSError(
            errno.ENOSPC, f"No space left on device ({free / 1e6:.1f} MB free)", str(target)
        ) from error


def current_umask() -> int:
    """The process umask, read without changing it (``/proc``; else set and restore)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def chmod_for_umask(path: str | os.PathLike[str], *, directory: bool = False) -> None:
    """Give ``path`` the mode a plain ``open()`` would: 0666 (0777 for a folder) less the
    umask. Temporary files are made private (0600) by ``mkstemp``; the published file
    must be readable by an analyst's account, a tile server or a QGIS server."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_orphans(directory: Path, name: str) -> list[Path]:
    """Delete the temporary files that killed writers of ``name`` left in ``directory``.

    Writers name their temporary files ``.<name>.<pid>.*``; a file whose process is gone
    is an orphan (a run killed mid-write). Files of live processes are left alone, so
    concurrent writers never lose each other's work. Returns what was removed.
    """
    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    prefix = f".{name}."
    for p in directory.iterdir():
        if not p.name.startswith(prefix):
            continue
        pid = p.name[len(prefix) :].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``target``; on success swap it in.

    The old directory (if any) is moved aside first and deleted only after the new one
    is in place, so a failure at any point leaves one complete version on disk.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(target.parent, target.name)
    tmp = Path(
        tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent)
    )
    try:
        yield tmp
        chmod_for_umask(tmp, directory=True)  # mkdtemp makes 0700
        old: Path | None = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            if old.exists():
                shutil.rmtree(old)
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json(target: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as stable, indented JSON (sorted keys), atomically."""
    target = Path(target)
    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return target


def write_bytes(target: str | os.PathLike[str], data: bytes) -> Path:
    target = Path(target)
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return target
