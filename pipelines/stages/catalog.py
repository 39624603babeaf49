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
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any

import duckdb

from pipelines.infra.errors import first_line
from pipelines.infra.layout import CATALOG_FILE, RISK_TABLES
from pipelines.infra.storage import chmod_for_umask
from pipelines.stages.context import TABLE_KINDS as CONTEXT_TABLES

log = logging.getLogger(__name__)

#: The SQL files: the project's sql/, reached through the pipelines/sql link in a
#: checkout and shipped as package data in a wheel.
SQL_DIR = Path(__file__).resolve().parents[1] / "sql"  # pipelines/sql (package data)
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
    root: Path | None = None,
) -> duckdb.DuckDBPyConnection:
    """Open DuckDB with the spatial extension loaded from its package, by path.

    A catalog file held by another writer (another Dagster run, an analyst's session) is
    retried for ``lock_timeout_s`` seconds before a clear error. For a database file,
    DuckDB's ``home_directory`` is the data root (``root``, default: the file's folder):
    the catalog's views name their files ``~/<table>/<region>/<period>.parquet``.
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
            if not _held(e):
                raise CatalogError(f"cannot open the DuckDB catalog {database}: {e}") from e
            if time.monotonic() > deadline:
                raise CatalogError(
                    f"cannot open the DuckDB catalog {database}: another process holds it "
                    f"for writing ({e}). Close other sessions that hold it (analysts can "
                    "open it with read_only=True)."
                ) from e
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
    con.execute(f"LOAD {sql_literal(str(extension_path('spatial')))}")
    if str(database) != ":memory:":
        home = Path(root) if root is not None else Path(database).resolve().parent
        con.execute(f"SET home_directory = {sql_literal(glob_escape(str(home.resolve())))}")
    return con


def _held(e: Exception) -> bool:
    """Whether DuckDB refused a file because another process holds its lock (not, say,
    because a damaged file "could not read block")."""
    text = str(e).lower()
    return "could not set lock" in text or "conflicting lock" in text


class CatalogError(RuntimeError):
    """The catalog cannot be opened or built; the message says why and what to do."""


def glob_escape(path: str) -> str:
    """``path`` with DuckDB's glob characters taken literally (``[`` as ``[[]``, ...).

    DuckDB expands ``*``, ``?`` and ``[...]`` in every file name it reads, also in a
    list of files and after ``~`` expansion: a data root named ``data [ab]`` would read
    ``data a``. A one-character class matches exactly that character.
    """
    return "".join(f"[{c}]" if c in "[*?{" else c for c in path)


#: What an analyst's connection may run: statements that only read.
ANALYST_STATEMENTS = ("SELECT", "EXPLAIN")


def connect_analyst(
    root: Path, *, lock_timeout_s: float = 30.0, say: Callable[[str], None] | None = None
) -> duckdb.DuckDBPyConnection:
    """A read-only catalog connection that cannot touch files outside the data root.

    The catalog file is opened read-only; external access is switched off except for the
    data root (``allowed_directories``), and the configuration is locked,
    so a query can neither read ``/etc/passwd`` nor switch the protection off. Writing
    into the data root (``COPY ... TO``) is refused by ``run_analyst_query``, which runs
    only SELECT and EXPLAIN statements.
    """
    db = ensure_catalog(root, say)
    con = connect(db, read_only=True, lock_timeout_s=lock_timeout_s, root=root)
    # The views name their files under ~ (the data root); DuckDB checks the name as given.
    con.execute("SET allowed_directories = $1", [["~/", str(Path(root).resolve()) + "/"]])
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return con


class AnalystQueryError(ValueError):
    """A query ``asmwatch sql`` refuses or cannot parse; the message says why."""


def run_analyst_query(con: duckdb.DuckDBPyConnection, query: str) -> duckdb.DuckDBPyRelation | None:
    """Run ``query`` if every statement in it only reads (SELECT, EXPLAIN)."""
    try:
        statements = con.extract_statements(query)
    except duckdb.ParserException as e:
        raise AnalystQueryError(first_line(e)) from None
    for st in statements:
        kind = st.type.name
        if kind not in ANALYST_STATEMENTS:
            raise AnalystQueryError(
                f"{kind} statements are refused: the catalog is read-only for queries "
                f"(only {' and '.join(ANALYST_STATEMENTS)}); to export a result, "
                "use `asmwatch sql --format csv` and redirect its output"
            )
    rel = None
    for st in statements:
        rel = con.sql(st.query)
    return rel


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
    **{table: (f"{table}_view", f"risk/{table}/*/*.parquet") for table in RISK_TABLES},
    **{layer: ("context_view", f"context/*/{layer}.parquet") for layer in CONTEXT_TABLES},
}


def view_files(root: Path, glob: str) -> list[str]:
    """The files of a view, as paths relative to the data root (sorted)."""
    return sorted(p.relative_to(root).as_posix() for p in root.glob(glob))


def files_literal(files: list[str]) -> str:
    """A DuckDB list literal of file names (for ``read_parquet``), glob characters
    escaped; relative names (of ``view_files``) are taken under ``~``, the data root."""
    names = [f if f.startswith("/") else f"~/{f}" for f in files]
    return "[" + ", ".join(sql_literal(glob_escape(f)) for f in names) + "]"


def refresh_views(
    root: Path,
    database: Path | None = None,
    *,
    say: Callable[[str], None] | None = None,
    regions: Collection[str] | None = None,
) -> dict[str, Any]:
    """(Re)create every view whose files exist; returns {view: status}.

    Each view reads an explicit list of its files relative to the data root
    (``~/sites/<region>/<period>.parquet``, with DuckDB's ``home_directory`` set to the
    root by ``connect``): no character of the root's own path is taken as a glob, the
    working directory plays no part, and a data root that is moved or copied keeps a
    working catalog that reads its own files. A file that
    cannot be read, or lacks a column of its table's contract, is left out of its view,
    logged and named in the status (``asmwatch doctor`` says what to re-materialise).
    The view DDL comes from ``sql/<view>_view.sql`` with the file list substituted as
    literals (DDL takes no bound parameters).

    ``regions``: the region ids of the regions file. Files of any other region (one
    removed from the file) are left out of every view, each such region warned about and
    named in the status, so its old rows are not served as if current.
    """
    from pipelines.infra.integrity import parquet_problem

    warn = say or log.warning
    root = Path(root)
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
        staged = tmp
        if "?" in str(db.parent):
            # DuckDB names its write-ahead log by cutting the path at a '?' (as if it
            # were a URL's query): build elsewhere, then copy beside the target.
            tmp = Path(tempfile.mkdtemp(prefix="asmwatch-catalog-")) / tmp.name
        con = connect(tmp, root=root)
        try:
            removed: dict[str, int] = {}
            for view, (sql_name, glob) in VIEWS.items():
                files = view_files(root, glob)
                if regions is not None and view != "models":  # <table>/<region>/<file>
                    gone = [f.split("/")[-2] for f in files if f.split("/")[-2] not in regions]
                    for region_id in gone:
                        removed[region_id] = removed.get(region_id, 0) + 1
                    files = [f for f in files if f.split("/")[-2] in regions]
                if not files:
                    status[view] = "no files yet"
                    if view in CONTEXT_TABLES:  # a region without the layer has none of it
                        empty_context_view(con, view)
                    continue
                good: list[str] = []
                bad: list[str] = []
                for f in files:
                    problem = parquet_problem(root / f)
                    if problem is None:
                        good.append(f)
                    else:
                        bad.append(f"{f} ({problem})")
                try:
                    if good:
                        create_view(con, view, sql_name, good)
                except duckdb.Error:
                    # Some file lacks a column the view needs (written by an older
                    # version, or damaged): find which, leave it out, keep the rest.
                    keep = []
                    for f in good:
                        try:
                            create_view(con, view, sql_name, [f])
                            keep.append(f)
                        except duckdb.Error as e:
                            bad.append(f"{f} ({first_line(e)})")
                    good = keep
                    con.execute(f"DROP VIEW IF EXISTS {view}")
                    if good:
                        create_view(con, view, sql_name, good)
                for b in bad:
                    warn(f"catalog: view {view} leaves out {b}; re-materialise it (`asmwatch doctor` lists what)")  # fmt: skip
                left_out = f"; left out {len(bad)}: {'; '.join(bad)}" if bad else ""
                if not good:
                    status[view] = f"error: no usable file{left_out} (re-materialise its asset)"
                    continue
                status[view] = f"{len(good)} file(s){left_out}"
            for region_id, n in sorted(removed.items()):
                warn(
                    f"catalog: region {region_id!r} is not in the regions file: its {n} "
                    "table file(s) are left out of the views (`asmwatch doctor` lists them)"
                )
            if removed:
                status["regions_left_out"] = sorted(removed)
            con.execute("CHECKPOINT")
        except BaseException:
            con.close()
            tmp.unlink(missing_ok=True)
            if staged != tmp:
                shutil.rmtree(tmp.parent, ignore_errors=True)
            raise
        con.close()
        if staged != tmp:
            shutil.copyfile(tmp, staged)
            shutil.rmtree(tmp.parent, ignore_errors=True)
        chmod_for_umask(staged)  # DuckDB's own file mode; readable by others under 022
        os.replace(staged, db)
        db.with_name(db.name + ".wal").unlink(missing_ok=True)  # from a pre-rename writer
    return status


def empty_context_view(con: duckdb.DuckDBPyConnection, view: str) -> None:
    """A context layer's view with its contract's columns and no rows: a query on a
    layer no region has (``rivers``) returns nothing rather than a Catalog Error, as it
    does for a region that lacks a layer others have."""
    from pipelines.infra.checks import CONTRACTS

    columns = ", ".join(
        f"CAST(NULL AS {kind}) AS {name}" for name, kind in CONTRACTS["context"].columns.items()
    )
    bbox = "CAST(NULL AS STRUCT(xmin DOUBLE, ymin DOUBLE, xmax DOUBLE, ymax DOUBLE)) AS bbox"
    con.execute(
        f"CREATE OR REPLACE VIEW {view} AS SELECT {columns}, {bbox} WHERE false"
    )  # names from the code


def create_view(con: duckdb.DuckDBPyConnection, view: str, sql_name: str, files: list[str]) -> None:
    """``CREATE OR REPLACE VIEW <view>`` from ``sql/<sql_name>.sql`` over ``files``
    (relative to the data root, or absolute)."""
    ddl = load_sql(sql_name).replace(":files", files_literal(files))
    con.execute(ddl.replace(":view", view))  # a key of VIEWS, not input


def catalog_problem(db: Path) -> str | None:
    """Why the catalog file cannot be used (missing, empty, damaged), or None."""
    if not db.exists():
        return "it is missing"
    if db.stat().st_size == 0:
        return "it is empty (0 bytes)"
    try:
        con = duckdb.connect(str(db), read_only=True)
    except duckdb.IOException as e:
        if _held(e):
            return None  # held by a writer: usable once it lets go, not damaged
        return f"it is damaged ({first_line(e)})"
    except duckdb.Error as e:
        return f"it is damaged ({first_line(e)})"
    con.close()
    return None


def ensure_catalog(root: Path, say: Callable[[str], None] | None = None) -> Path:
    """The catalog of ``root``, rebuilt from the files first when it is missing or damaged.

    The catalog holds only views over the GeoParquet files, so rebuilding it loses
    nothing; ``say`` (default: a logged warning) gets one line saying that it happened.
    """
    root = Path(root)
    db = root / CATALOG_FILE
    problem = catalog_problem(db)
    if problem is not None:
        (say or log.warning)(f"catalog {db}: {problem}; rebuilding it from the files under {root}")
        refresh_views(root, say=say)
    return db


#: DuckDB's memory for the project's own catalog queries (risk tables, reports); joins,
#: sorts and aggregates beyond it spill to disk instead of taking the machine.
MEMORY_LIMIT = "2GB"


def open_catalog(root: Path, say: Callable[[str], None] | None = None) -> duckdb.DuckDBPyConnection:
    """A read-only connection to the catalog of ``root`` (rebuilt first if damaged),
    its memory held to ``MEMORY_LIMIT``."""
    con = connect(ensure_catalog(root, say), read_only=True, root=root)
    con.execute(f"SET memory_limit = '{MEMORY_LIMIT}'")
    return con


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
