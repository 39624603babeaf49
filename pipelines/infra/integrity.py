"""Is every file the catalog and Dagster expect there, whole and readable?

Used by the catalog build (a Parquet file whose footer cannot be read is left out of its
view, not read) and by ``asmwatch doctor``, which checks every table file and raster
under the data root, and every file a Dagster materialisation says it wrote, and prints
what to re-materialise.

Checks, per file:

- GeoParquet tables: the footer reads (a truncated or zeroed file fails here), every
  row group decodes (deep check only), and the file binds to its catalog view's SQL
  (every column the view selects is present).
- COGs (composite, probability): GDAL opens it, it is tiled with overviews, and the
  last block of every band and of the smallest overview decodes (a file cut short
  fails here rather than deep inside a later stage's read).
- The model registry: every registered checkpoint exists and loads.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.infra.errors import first_line
from pipelines.regions import partition_key


def parquet_problem(path: Path, *, deep: bool = False) -> str | None:
    """Why ``path`` is not a readable Parquet file, or None.

    The footer is read always (cheap: a truncated, emptied or zeroed file fails); with
    ``deep`` every row group is decoded too, one at a time (memory stays bounded).
    """
    import pyarrow.parquet as pq

    if not path.exists():
        return "missing"
    if path.stat().st_size == 0:
        return "empty file (0 bytes)"
    try:
        pf = pq.ParquetFile(path)
        if deep:
            for i in range(pf.num_row_groups):
                pf.read_row_group(i)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError and others
        return f"not readable as Parquet: {first_line(e)}"
    return None


def cog_problem(path: Path) -> str | None:
    """Why ``path`` is not a whole, readable COG, or None."""
    import rasterio
    from rasterio.windows import Window

    if not path.exists():
        return "missing"
    if path.stat().st_size == 0:
        return "empty file (0 bytes)"
    try:
        with rasterio.open(path) as src:
            if not src.profile.get("tiled", False):
                return "not tiled (not a COG)"
            h, w = src.height, src.width
            bh, bw = src.block_shapes[0]
            x0, y0 = ((w - 1) // bw) * bw, ((h - 1) // bh) * bh
            # Every band's last block: a file cut short fails here.
            src.read(window=Window(x0, y0, w - x0, h - y0))
            ovr = src.overviews(1)
            if ovr:
                with rasterio.open(path, overview_level=len(ovr) - 1) as small:
                    small.read()
    except Exception as e:  # rasterio/GDAL errors of several types
        return f"not readable as a GeoTIFF: {first_line(e)}"
    return None


def view_problem(con: Any, root: Path, view: str, rel: str) -> str | None:
    """Why the file ``rel`` (relative to ``root``) does not bind to its catalog view.

    ``con``: a DuckDB connection with spatial loaded (``catalog.connect()``); the view
    is created in it over this one file, as the catalog would.
    """
    import duckdb

    from pipelines.stages.catalog import VIEWS, create_view

    try:
        create_view(con, view, VIEWS[view][0], [str((root / rel).resolve())])
        con.execute(f"SELECT * FROM {view} LIMIT 0").fetchall()
    except duckdb.Error as e:
        return f"does not match its table ({first_line(e)})"
    return None


@dataclass
class Finding:
    path: str  # relative to the data root
    problem: str
    asset: str | None = None  # the Dagster asset that writes it
    partition: str | None = None  # its partition key, when known


@dataclass
class DoctorReport:
    root: Path
    checked: int = 0
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings

    def rematerialise(self) -> list[tuple[str, str | None]]:
        """(asset, partition) pairs to re-run, each once, in order of appearance."""
        seen: dict[tuple[str, str | None], None] = {}
        for f in self.findings:
            if f.asset:
                seen.setdefault((f.asset, f.partition), None)
        return list(seen)


def _table_files(root: Path) -> Iterable[tuple[str, str, str, str | None]]:
    """(relative path, view, asset, partition key) of every table file under the root."""
    from pipelines.stages.catalog import VIEWS

    assets = {
        "scenes": "scenes", "models": "mining_model", "asm_sites": "asm_sites",
        "asm_change": "asm_change", "region_summary": "asm_change",
        "concession_risk": "concession_risk", "protected_area_pressure": "protected_area_pressure",
        "hotspots": "hotspots", "alerts": "alerts", "alert_features": "alerts",
    }  # fmt: skip
    for view, (_sql, glob) in VIEWS.items():
        for p in sorted(root.glob(glob)):
            rel = p.relative_to(root).as_posix()
            parts = rel.split("/")
            if view == "models":
                key = None
            elif parts[0] == "context":
                key = parts[1]  # region-partitioned
            else:
                key = partition_key(parts[-2], p.stem)
            yield rel, view, assets.get(view, "context_layers"), key


RASTERS = (("composite", "composite"), ("probability", "mining_probability"))


def removed_region_files(root: Path, region_ids: Iterable[str]) -> dict[str, list[str]]:
    """Files under ``root`` (tables, COGs, reports) of regions the regions file does not
    define, by region id: what a region removed from the file left behind."""
    from pipelines.stages.catalog import VIEWS

    keep = set(region_ids)
    globs = [g for view, (_sql, g) in VIEWS.items() if view != "models"]
    globs += [f"{folder}/*/*.tif" for folder, _asset in RASTERS] + ["reports/*/*"]
    out: dict[str, list[str]] = {}
    for glob in dict.fromkeys(globs):
        for p in sorted(Path(root).glob(glob)):
            region_id = p.parent.name
            if region_id not in keep and p.is_file():
                out.setdefault(region_id, []).append(p.relative_to(root).as_posix())
    return dict(sorted(out.items()))


def doctor(
    root: Path,
    *,
    deep: bool = True,
    recorded: Iterable[tuple[str, str, str]] = (),
) -> DoctorReport:
    """Check every file under ``root`` the catalog reads, and those a run recorded.

    ``recorded``: (path relative to the root, asset, partition key) of every file that
    a materialisation says it wrote (``assets.doctor.recorded_files`` reads them from
    the Dagster instance); one that is not there is a finding.
    """
    from ml import registry

    root = Path(root)
    report = DoctorReport(root)
    if not root.is_dir():
        report.findings.append(Finding(str(root), "the data root does not exist"))
        return report
    from pipelines.stages.catalog import connect

    con = connect()  # one connection (spatial loaded once) for every table file
    try:
        for rel, view, asset, key in _table_files(root):
            report.checked += 1
            problem = parquet_problem(root / rel, deep=deep) or view_problem(con, root, view, rel)
            if problem:
                report.findings.append(Finding(rel, problem, asset, key))
    finally:
        con.close()
    for folder, asset in RASTERS:
        for p in sorted((root / folder).glob("*/*.tif")):
            report.checked += 1
            rel = p.relative_to(root).as_posix()
            if problem := cog_problem(p):
                report.findings.append(
                    Finding(rel, problem, asset, partition_key(p.parent.name, p.stem))
                )
    try:
        records = registry.records(root, say=report.notes.append)
    except registry.RegistryError as e:
        report.findings.append(Finding("models/models.parquet", str(e), "mining_model"))
        records = []
    for r in records:
        report.checked += 1
        if problem := registry.checkpoint_problem(root, r):
            report.findings.append(Finding(r.path, problem, "mining_model"))
    known = {f.path for f in report.findings}
    for rel, asset, key in recorded:
        if rel in known:
            continue
        report.checked += 1
        if not (root / rel).exists():
            known.add(rel)
            report.findings.append(Finding(rel, "missing (a run recorded it as written)", asset, key))  # fmt: skip
    from pipelines.stages.catalog import CATALOG_FILE, catalog_problem

    if problem := catalog_problem(root / CATALOG_FILE):
        report.notes.append(f"the catalog {CATALOG_FILE}: {problem}; `asmwatch doctor --fix` or any run rebuilds it")  # fmt: skip
    return report
