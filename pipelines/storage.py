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


def partition_path(root: Path, table: str, region: str, period: str, suffix: str) -> Path:
    """``<root>/<table>/<region>/<period><suffix>``; ids were validated as path-safe."""
    return root / table / region / f"{period}{suffix}"


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success rename it onto ``target``.

    On any exception the temporary file is removed and ``target`` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``target``; on success swap it in.

    The old directory (if any) is moved aside first and deleted only after the new one
    is in place, so a failure at any point leaves one complete version on disk.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
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
