"""GeoParquet tables read and written in chunks (pipelines/infra/geotable.py)."""

from __future__ import annotations

import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import shapely

from pipelines.infra.geotable import GeoParquetWriter, GeoTableError, read_chunks


def _frame(n: int) -> gpd.GeoDataFrame:
    rng = np.random.default_rng(0)
    x, y = rng.uniform(-70, -69, n), rng.uniform(-13, -12, n)
    geoms = list(shapely.box(x, y, x + 0.01, y + 0.01))
    geoms[3] = shapely.MultiPolygon([geoms[3], shapely.box(x[3] + 0.02, y[3], x[3] + 0.03, y[3] + 0.01)])  # fmt: skip
    return gpd.GeoDataFrame(
        {
            "id": pd.array([f"s{i}" for i in range(n)], dtype="string"),
            "area_ha": rng.uniform(0, 5, n),
            "note": pd.array([None] * n, dtype="string"),
        },
        geometry=geoms,
        crs=4326,
    )


def test_chunks_write_the_file_to_parquet_writes(tmp_path: Path) -> None:
    """Chunks of 7 rows: the same frame, bbox column and ``geo`` metadata (CRS, the
    geometry types and bounds of all chunks) as ``to_parquet`` of the whole frame."""
    frame = _frame(40)
    whole = tmp_path / "whole.parquet"
    frame.to_parquet(whole, write_covering_bbox=True, index=False)
    chunked = tmp_path / "chunked.parquet"
    with GeoParquetWriter(chunked, frame.iloc[:0]) as out:
        for start in range(0, len(frame), 7):
            out.write(frame.iloc[start : start + 7])
        out.write(frame.iloc[:0])  # an empty chunk is skipped
    assert out.rows == 40
    assert pq.read_metadata(chunked).num_row_groups == 6
    geo = [json.loads(pq.read_metadata(p).metadata[b"geo"]) for p in (whole, chunked)]
    assert geo[0] == geo[1]
    assert geo[1]["columns"]["geometry"]["geometry_types"] == ["MultiPolygon", "Polygon"]
    a, b = gpd.read_parquet(whole), gpd.read_parquet(chunked)
    pd.testing.assert_frame_equal(a, b)
    assert pq.read_table(whole).column("bbox").equals(pq.read_table(chunked).column("bbox"))


def test_no_chunk_writes_the_empty_table(tmp_path: Path) -> None:
    target = tmp_path / "empty.parquet"
    with GeoParquetWriter(target, _frame(5).iloc[:0]):
        pass
    back = gpd.read_parquet(target)
    assert len(back) == 0 and list(back.columns) == ["id", "area_ha", "note", "geometry"]
    assert back.crs.to_epsg() == 4326


def test_read_chunks_in_rows_with_missing_columns_as_nulls(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    _frame(25).to_parquet(path, write_covering_bbox=True, index=False)
    chunks = list(read_chunks(path, ("id", "first_seen_period"), rows=10))
    assert [len(g) for g, _ in chunks] == [10, 10, 5]
    geoms, cols = chunks[1]
    assert geoms.crs.to_epsg() == 4326
    assert shapely.equals_exact(geoms.to_numpy(), _frame(25).geometry.to_numpy()[10:20], 0).all()
    assert cols["id"].to_pylist() == [f"s{i}" for i in range(10, 20)]
    assert cols["first_seen_period"].null_count == 10, "a column the file lacks: nulls"


def test_read_chunks_names_a_file_that_is_not_geoparquet(tmp_path: Path) -> None:
    plain = tmp_path / "plain.parquet"
    pd.DataFrame({"a": [1]}).to_parquet(plain)
    with pytest.raises(GeoTableError, match=r"plain\.parquet: not a GeoParquet file"):
        list(read_chunks(plain))
    arrow = tmp_path / "arrow.parquet"
    _frame(4).to_parquet(arrow, geometry_encoding="geoarrow")
    with pytest.raises(GeoTableError, match=r"arrow\.parquet: geometry encoded as .*expected WKB"):
        list(read_chunks(arrow))
    missing = tmp_path / "missing.parquet"
    with pytest.raises(GeoTableError, match=r"missing\.parquet: not a readable Parquet file"):
        list(read_chunks(missing))


def test_rows_sort_by_buckets_in_bounded_pieces(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``sort_rows`` deals the rows into buckets of consecutive ranks and sorts each:
    buckets of 7 rows and chunks of 5 put every row at its rank, with the extra column,
    in row groups of the size asked, and leave no bucket file behind."""
    import pyarrow as pa

    import pipelines.infra.geotable as geotable

    monkeypatch.setattr(geotable, "BUCKET_ROWS", 7)
    monkeypatch.setattr(geotable, "READ_ROWS", 5)
    n = 53
    rng = np.random.default_rng(1)
    source = tmp_path / "rows.parquet"
    blobs = [bytes(rng.integers(0, 255, rng.integers(1, 40), dtype=np.uint8)) for _ in range(n)]
    pq.write_table(pa.table({"row": np.arange(n), "blob": blobs}), source, row_group_size=11)
    rank = geotable.rank_of(rng.permutation(n))
    work = tmp_path / "work"
    work.mkdir()
    out = geotable.sort_rows(source, tmp_path / "sorted.parquet", rank, work, extra={"tag": rank * 10}, row_group_rows=4)  # fmt: skip
    table = pq.read_table(out)
    rows = table.column("row").to_numpy()
    assert (rank[rows] == np.arange(n)).all(), "each row at its rank"
    assert [blobs[r] for r in rows] == table.column("blob").to_pylist()
    assert (table.column("tag").to_numpy() == rank[rows] * 10).all()
    meta = pq.read_metadata(out)
    assert all(meta.row_group(i).num_rows <= 4 for i in range(meta.num_row_groups))
    assert list(work.iterdir()) == []
