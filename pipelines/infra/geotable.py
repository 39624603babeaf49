"""GeoParquet tables read, sorted and written in chunks of rows, never held whole.

For stages whose tables grow with a region (``asm_change``: a period's sites, the
previous period's sites and change rows, and its own rows): memory follows the chunk,
not the table.

- ``read_chunks``: a GeoParquet file ``READ_ROWS`` rows at a time (pyarrow);
- ``streamed``: a Parquet file opened to be read batch by batch;
- ``sort_rows``: a Parquet file's rows in a given order, an external sort by buckets;
- ``GeoParquetWriter``: writes chunks of a GeoDataFrame into one GeoParquet file with
  the metadata ``GeoDataFrame.to_parquet(write_covering_bbox=True)`` writes for the whole
  frame (CRS, geometry types and bounds of all chunks, the ``bbox`` covering column);
- ``RowSpill`` and ``write_sorted``: a table's rows spilled as they come, then sorted
  (``sort_rows``) into that GeoParquet, atomically.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.infra.storage import atomic_path

#: Rows per chunk read from or written to a table.
READ_ROWS = 2_000
#: Rows per row group of the GeoParquet tables the stages write: a reader of chunks
#: holds one row group's pages at a time.
ROW_GROUP_ROWS = 10_000
#: Rows per bucket of ``sort_rows``: the rows it holds at a time.
BUCKET_ROWS = 10_000
#: Rows per row group of a sorted scratch table (a reader of one key's rows reads few).
SORTED_ROW_GROUP = 2048


class GeoTableError(ValueError):
    """A GeoParquet file that cannot be read as one: names the file and the problem."""


def with_metadata(table: pa.Table, metadata: dict[str, str] | None) -> pa.Table:
    """``table`` with ``metadata`` added to its schema's key-value metadata (what a stage
    records of how it made the table: the sites' minimum mapping unit, the alerts'
    settings)."""
    if not metadata:
        return table
    extra = {k.encode(): v.encode() for k, v in metadata.items()}
    return table.replace_schema_metadata({**(table.schema.metadata or {}), **extra})


def recorded(path: Path, keys: Iterable[str]) -> dict[str, float]:
    """The numbers a stage recorded under ``keys`` in a Parquet file's key-value
    metadata (its footer, read once), by key; a key the file does not record is absent."""
    meta = pq.read_metadata(path).metadata or {}
    return {k: float(meta[k.encode()]) for k in keys if k.encode() in meta}


def geo_metadata(path: Path) -> dict[str, Any]:
    """The ``geo`` metadata of a GeoParquet file (its primary column, CRS, encoding)."""
    try:
        meta = pq.read_metadata(path).metadata or {}
    except (OSError, pa.ArrowInvalid) as e:
        raise GeoTableError(f"{path}: not a readable Parquet file ({e})") from e
    if b"geo" not in meta:
        raise GeoTableError(f"{path}: not a GeoParquet file (no 'geo' metadata)")
    geo: dict[str, Any] = json.loads(meta[b"geo"])
    column = geo["columns"][geo["primary_column"]]
    if column.get("encoding", "WKB").upper() != "WKB":
        raise GeoTableError(f"{path}: geometry encoded as {column['encoding']}, expected WKB")
    return geo


def streamed(path: Path) -> pq.ParquetFile:
    """A Parquet file to read batch by batch, holding one row group's pages at a time.

    pyarrow pre-buffers by default, and its reader then keeps every row group it read
    until the file is closed: reading 700 MB of WKB in chunks of 2,000 rows held 700 MB.
    """
    return pq.ParquetFile(path, pre_buffer=False)


def read_chunks(
    path: Path, columns: tuple[str, ...] = (), rows: int = READ_ROWS
) -> Iterator[tuple[Any, dict[str, pa.Array]]]:
    """``path`` ``rows`` rows at a time: (a GeoSeries in the file's CRS, ``columns``).

    A column the file lacks comes as nulls (an optional column of older files).
    """
    import geopandas as gpd
    import shapely
    from pyproj import CRS

    geo = geo_metadata(path)
    primary = geo["primary_column"]
    crs = geo["columns"][primary].get("crs", "OGC:CRS84")  # GeoParquet's default CRS
    crs = CRS.from_user_input(crs) if crs is not None else None
    source = streamed(path)
    have = set(source.schema_arrow.names)
    read = [primary, *(c for c in columns if c in have)]
    for batch in source.iter_batches(batch_size=rows, columns=read):
        geoms = gpd.GeoSeries(shapely.from_wkb(batch.column(primary)), crs=crs)
        out = {
            c: batch.column(c) if c in have else pa.nulls(batch.num_rows, pa.string())
            for c in columns
        }
        yield geoms, out


class GeoParquetWriter:
    """One GeoParquet file written chunk by chunk (GeoDataFrames of the same columns).

    The file is what ``GeoDataFrame.to_parquet(path, write_covering_bbox=True,
    index=False)`` writes for all chunks at once: the same columns, the ``bbox``
    covering column, and ``geo`` metadata with the CRS and the geometry types and
    bounds of every chunk (set when the writer closes). ``empty`` is the frame written
    when no chunk was. ``metadata`` goes into the file's key-value metadata too (what a
    stage records of how it made the table, e.g. the sites' minimum mapping unit).
    """

    def __init__(self, path: Path, empty: Any, metadata: dict[str, str] | None = None) -> None:
        self.path = path
        self.empty = empty
        self.metadata = dict(metadata or {})
        self._writer: pq.ParquetWriter | None = None
        self._geo: dict[str, Any] | None = None
        self._types: set[str] = set()
        self._bounds: list[list[float]] = []
        self.rows = 0

    def write(self, frame: Any) -> None:
        from geopandas.io.arrow import _geopandas_to_arrow  # what to_parquet calls

        if not len(frame):
            return
        table = _geopandas_to_arrow(frame, index=False, write_covering_bbox=True)
        meta = dict(table.schema.metadata or {})
        geo = json.loads(meta.pop(b"geo"))
        column = geo["columns"][geo["primary_column"]]
        if self._writer is None:
            self._geo = geo
            self._writer = pq.ParquetWriter(self.path, table.schema.with_metadata(meta))
        elif column.get("crs") != self._geo_column().get("crs"):
            raise ValueError(f"{self.path}: a chunk in another CRS than the first")
        self._types.update(column.get("geometry_types", []))
        if "bbox" in column:
            self._bounds.append(column["bbox"])
        self._writer.write_table(table.replace_schema_metadata(meta))
        self.rows += len(frame)

    def _geo_column(self) -> dict[str, Any]:
        assert self._geo is not None
        column: dict[str, Any] = self._geo["columns"][self._geo["primary_column"]]
        return column

    def close(self) -> None:
        if self._writer is None:
            from geopandas.io.arrow import _geopandas_to_arrow

            table = _geopandas_to_arrow(self.empty, index=False, write_covering_bbox=True)
            pq.write_table(with_metadata(table, self.metadata), self.path)
            return
        column = self._geo_column()
        column["geometry_types"] = sorted(self._types)
        if self._bounds:
            b = np.asarray(self._bounds, dtype=float)
            column["bbox"] = [*b[:, :2].min(axis=0).tolist(), *b[:, 2:].max(axis=0).tolist()]
        self._writer.add_key_value_metadata({"geo": json.dumps(self._geo), **self.metadata})
        self._writer.close()

    def __enter__(self) -> GeoParquetWriter:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if error is None:
            self.close()
        elif self._writer is not None:  # the caller's atomic write discards the file
            self._writer.close()


class RowSpill:
    """Rows of a table spilled to a scratch Parquet as they come (``schema``; the
    geometry as WKB), for ``write_sorted``."""

    def __init__(self, path: Path, schema: pa.Schema) -> None:
        self.path = path
        self.schema = schema
        self.rows = 0
        self._writer = pq.ParquetWriter(path, schema)

    def write(self, columns: dict[str, Any]) -> None:
        """One chunk of rows: a sequence per column, ``geometry`` shapely geometries."""
        import shapely

        data = dict(columns)
        data["geometry"] = shapely.to_wkb(np.asarray(data["geometry"], dtype=object))
        table = pa.table(data, schema=self.schema)
        if table.num_rows:
            self._writer.write_table(table)
            self.rows += table.num_rows

    def close(self) -> None:
        self._writer.close()


def sort_rows(
    source: Path,
    target: Path,
    rank: npt.NDArray[np.int64],
    work: Path,
    *,
    extra: dict[str, npt.NDArray[Any]] | None = None,
    row_group_rows: int = SORTED_ROW_GROUP,
) -> Path:
    """The rows of the Parquet ``source`` written to ``target`` in the order of ``rank``
    (each row's place in the output), with ``extra`` columns (a value per source row),
    in row groups of ``row_group_rows``.

    An external sort by buckets: one pass deals the rows, ``READ_ROWS`` at a time, into
    files of ``BUCKET_ROWS`` consecutive ranks in ``work``; then each bucket is read,
    sorted and appended. Memory follows the bucket, not the table. (DuckDB's ORDER BY
    ran out of memory here on large geometry payloads: 177 MB of WKB in 128 MB and
    256 MB, 700 MB in 512 MB.)
    """
    rank = np.asarray(rank, dtype=np.int64)
    source_file = streamed(source)
    extra = extra or {}
    schema = source_file.schema_arrow
    for name, values in extra.items():
        schema = schema.append(pa.field(name, pa.array(values[:0]).type))
    buckets = max(1, -(-len(rank) // BUCKET_ROWS))
    paths = [work / f"bucket-{i}.parquet" for i in range(buckets)]
    writers: dict[int, pq.ParquetWriter] = {}
    ranked = schema.append(pa.field("__rank", pa.int64()))
    start = 0
    try:
        for batch in source_file.iter_batches(batch_size=READ_ROWS):
            n = batch.num_rows
            table = pa.Table.from_batches([batch])
            for name, values in extra.items():
                table = table.append_column(name, pa.array(values[start : start + n]))
            table = table.append_column("__rank", pa.array(rank[start : start + n]))
            bucket = rank[start : start + n] // BUCKET_ROWS
            start += n
            for b in np.unique(bucket).tolist():
                if b not in writers:
                    writers[b] = pq.ParquetWriter(paths[b], ranked)
                writers[b].write_table(table.take(np.flatnonzero(bucket == b)))
    finally:
        for writer in writers.values():
            writer.close()
    with pq.ParquetWriter(target, schema) as out:
        for b, path in enumerate(paths):
            if b not in writers:
                continue
            rows = pq.read_table(path)
            rows = rows.take(pc.sort_indices(rows, sort_keys=[("__rank", "ascending")]))
            out.write_table(rows.drop_columns(["__rank"]), row_group_size=row_group_rows)
            path.unlink()
    return target


def rank_of(order: npt.NDArray[np.intp]) -> npt.NDArray[np.int64]:
    """Each row's place in the output, from the rows in output order (``argsort``)."""
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order), dtype=np.int64)
    return rank


def write_sorted(
    spill: RowSpill,
    order_by: str,
    target: Path,
    typed: Callable[[Any], Any],
    crs: Any,
    metadata: dict[str, str] | None = None,
) -> Path:
    """``spill``'s rows sorted by the column ``order_by`` (``sort_rows``; ties in the
    order they came) into the GeoParquet ``target``, atomically, chunk by chunk;
    ``typed`` gives each chunk (a GeoDataFrame in ``crs``) its columns and dtypes, and
    the empty table its schema; ``metadata``: the file's own key-value metadata."""
    import geopandas as gpd
    import shapely

    spill.close()
    columns = [c for c in spill.schema.names if c != "geometry"]
    empty = typed(gpd.GeoDataFrame({c: [] for c in columns}, geometry=[], crs=crs))
    keys = pq.read_table(spill.path, columns=[order_by])
    order = pc.sort_indices(keys, sort_keys=[(order_by, "ascending")]).to_numpy()
    del keys
    ordered = sort_rows(spill.path, spill.path.with_suffix(".sorted.parquet"), rank_of(order), spill.path.parent)  # fmt: skip
    with atomic_path(target) as tmp, GeoParquetWriter(tmp, empty, metadata) as out:
        for chunk in streamed(ordered).iter_batches(batch_size=READ_ROWS):
            data = chunk.drop_columns(["geometry"]).to_pandas()
            geoms = shapely.from_wkb(chunk.column("geometry"))
            out.write(typed(gpd.GeoDataFrame(data, geometry=geoms, crs=crs)))
    ordered.unlink()
    return target
