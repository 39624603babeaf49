"""The DuckDB catalog: views over the GeoParquet tables, for analysts and risk assets.

Last step of every table-writing stage. GeoParquet files are the source of truth; the
catalog (``<data root>/asmwatch.duckdb``) only holds views over them, so analysts can
query with DuckDB without running Dagster, and a lost catalog is rebuilt by
``refresh_views``. Every connection loads the spatial extension from its pip package by
path: nothing is ever downloaded (``autoinstall_known_extensions`` is off).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb

from pipelines.context import TABLE_KINDS as CONTEXT_TABLES

log = logging.getLogger(__name__)

CATALOG_FILE = "asmwatch.duckdb"
SQL_DIR = Path(__file__).resolve().parent.parent / "sql"
_DUCKDB_EXT_VERSION = "v" + duckdb.__version__


def extension_path(name: str) -> Path:
    """The ``.duckdb_extension`` file shipped by the ``duckdb-extension-<name>`` package."""
    import importlib

    try:
        mod = importlib.import_module(f"duckdb_extension_{name}")
    except ImportError as e:
        raise RuntimeError(
            f"DuckDB extension package duckdb-extension-{name} is not installed; "
            "run `make setup` (asmwatch never downloads extensions at run time)"
        ) from e
    assert mod.__file__ is not None
    path = (
        Path(mod.__file__).parent / "extensions" / _DUCKDB_EXT_VERSION / f"{name}.duckdb_extension"
    )
    if not path.exists():
        raise RuntimeError(
            f"{path} is missing: duckdb {duckdb.__version__} needs duckdb-extension-{name} of "
            "the same version"
        )
    return path


def extension_directory(
    target: Path, names: tuple[str, ...] = ("spatial", "icu", "parquet")
) -> Path:
    """Lay the pip-shipped extensions out as DuckDB's extension directory expects.

    ``<target>/v1.5.5/linux_amd64/<name>.duckdb_extension`` (symlinks). Clients that
    insist on an extension directory (rustac's DuckDB client) then find everything
    locally and never try to download.
    """
    import platform

    arch = {"x86_64": "linux_amd64", "aarch64": "linux_arm64"}.get(
        platform.machine(), "linux_amd64"
    )
    d = target / _DUCKDB_EXT_VERSION / arch
    d.mkdir(parents=True, exist_ok=True)
    for name in names:
        link = d / f"{name}.duckdb_extension"
        src = extension_path(name)
        if link.is_symlink() and link.resolve() == src.resolve():
            continue
        if link.exists() or link.is_symlink():
            link.unlink(missing_ok=True)
        try:
            link.symlink_to(src)
        except FileExistsError:  # another run laid it out at the same moment
            if link.resolve() != src.resolve():
                raise
    return target


def connect(
    database: str | Path = ":memory:",
    *,
    read_only: bool = False,
    lock_timeout_s: float = 30.0,
) -> duckdb.DuckDBPyConnection:
    """Open DuckDB with the spatial extension loaded from its package, by path.

    A catalog file held by another writer (another Dagster run, an analyst's session) is
    retried for ``lock_timeout_s`` seconds before a clear error.
    """
    config: dict[str, str | bool | int | float | list[str]] = {
        "autoinstall_known_extensions": False,
        "autoload_known_extensions": False,
    }
    deadline = time.monotonic() + lock_timeout_s
    delay = 0.2
    while True:
        try:
            con = duckdb.connect(str(database), read_only=read_only, config=config)
            break
        except duckdb.IOException as e:
            if "lock" not in str(e).lower() or time.monotonic() > deadline:
                raise RuntimeError(
                    f"cannot open the DuckDB catalog {database}: {e}. Close other sessions "
                    "that hold it for writing (analysts can open it with read_only=True)."
                ) from e
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
    con.execute(f"LOAD {sql_literal(str(extension_path('spatial')))}")
    return con


def sql_literal(value: str) -> str:
    """Quote a string as a SQL literal (used only for DDL, where DuckDB takes no parameters)."""
    return "'" + value.replace("'", "''") + "'"


def load_sql(name: str) -> str:
    """Read ``sql/<name>.sql``; names are fixed by the code, never by input."""
    if not re.match(r"^[a-z_]+$", name):
        raise ValueError(f"bad SQL file name {name!r}")
    return (SQL_DIR / f"{name}.sql").read_text(encoding="utf-8")


# The tables the catalog knows: view name -> (sql file, glob relative to the data root).
VIEWS: dict[str, tuple[str, str]] = {
    "scenes": ("scenes_view", "scenes/*/*.parquet"),
    "models": ("models_view", "models/models.parquet"),
    "asm_sites": ("asm_sites_view", "sites/*/*.parquet"),
    "asm_change": ("asm_change_view", "change/*/*.parquet"),
    "region_summary": ("region_summary_view", "summary/*/*.parquet"),
    **{
        table: (f"{table}_view", f"risk/{table}/*/*.parquet")
        for table in ("concession_risk", "protected_area_pressure", "hotspots", "alerts")
    },
    **{layer: ("context_view", f"context/*/{layer}.parquet") for layer in CONTEXT_TABLES},
}


def refresh_views(root: Path, database: Path | None = None) -> dict[str, Any]:
    """(Re)create every view whose files exist; returns {view: status}.

    The view DDL comes from ``sql/<view>_view.sql`` with the glob of the GeoParquet files
    substituted as a quoted literal (DDL takes no bound parameters).
    """
    db = database or root / CATALOG_FILE
    db.parent.mkdir(parents=True, exist_ok=True)
    status: dict[str, Any] = {}
    # The catalog is rebuilt in a new file and renamed over the old one, so a reader
    # (an analyst's read-only session, a risk or report step) never blocks the writer
    # and never sees half a catalog: open connections keep the file they opened.
    # Writers take turns through a lock file.
    with _writer_lock(db):
        tmp = db.with_name(f".{db.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        for stale in (tmp, tmp.with_name(tmp.name + ".wal")):
            stale.unlink(missing_ok=True)
        con = connect(tmp)
        try:
            for view, (sql_name, glob) in VIEWS.items():
                files = sorted(root.glob(glob))
                if not files:
                    status[view] = "no files yet"
                    continue
                ddl = load_sql(sql_name).replace(":files", sql_literal(str(root / glob)))
                ddl = ddl.replace(":view", view)  # a key of VIEWS above, not input
                try:
                    con.execute(ddl)
                except duckdb.Error as e:
                    # One table's files that the view cannot read (written by an older
                    # version, damaged) must not take the other views down with it.
                    first = str(e).splitlines()[0]
                    log.warning("catalog: view %s not created from %s: %s", view, glob, first)
                    status[view] = f"error: {first} (re-materialise its asset)"
                    continue
                status[view] = f"{len(files)} file(s)"
            con.execute("CHECKPOINT")
        except BaseException:
            con.close()
            tmp.unlink(missing_ok=True)
            raise
        con.close()
        os.replace(tmp, db)
        db.with_name(db.name + ".wal").unlink(missing_ok=True)  # from a pre-rename writer
    return status


@contextlib.contextmanager
def _writer_lock(db: Path) -> Iterator[None]:
    """Serialise catalog writers across processes (``<catalog>.lock``, flock)."""
    import fcntl

    with open(db.with_name(db.name + ".lock"), "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
