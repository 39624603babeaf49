"""ASM sites from probability rasters: threshold, clean-up, minimum mapping unit,
stable ids, GeoParquet in EPSG:4326 with a bbox column, and the DuckDB view."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
from affine import Affine

from pipelines.infra.layout import sites_path
from pipelines.stages.catalog import connect, refresh_views
from pipelines.stages.sites import extract_sites, write_sites


def _raster(path: Path, prob: np.ndarray, threshold: str = "0.5", crs: str = "EPSG:32719") -> Path:
    profile = {
        "driver": "GTiff", "width": prob.shape[1], "height": prob.shape[0], "count": 1,
        "dtype": "float32", "crs": crs, "transform": Affine(10, 0, 300_000, 0, -10, 8_600_000),
        "nodata": float("nan"),
    }  # fmt: skip
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(prob.astype(np.float32), 1)
        dst.update_tags(asmwatch_threshold=threshold)
    return path


def _scene() -> np.ndarray:
    p = np.zeros((200, 300), np.float32)
    p[20:70, 30:130] = 0.9  # 50 x 100 px = 50 ha
    p[100:150, 200:260] = 0.7  # 30 ha
    p[180:183, 10:13] = 0.95  # 0.09 ha: under the 0.5 ha unit
    p[160, 150] = 0.99  # a lone pixel: opened away
    p[40, 80] = 0.1  # a pinhole inside the first site: closed
    p[0:5, 0:5] = np.nan
    return p


def test_sites_have_the_right_areas_and_stable_ids(tmp_path: Path) -> None:
    src = _raster(tmp_path / "p.tif", _scene())
    a = extract_sites(src, "r", "2021")
    assert list(a.columns) == [
        "site_id",
        "region",
        "period",
        "area_ha",
        "mean_probability",
        "mapped_area_ha",
        "first_seen_period",
        "source",
        "geometry",
    ]
    assert (a["source"] == "model").all() and a["mapped_area_ha"].isna().all()
    assert a.crs.to_epsg() == 4326 and len(a) == 2
    assert sorted(a["area_ha"]) == pytest.approx([30.0, 50.0])
    assert sorted(a["mean_probability"]) == pytest.approx([0.7, 0.9], abs=0.01)
    assert a["site_id"].str.startswith("r-2021-").all() and a["site_id"].is_unique
    b = extract_sites(src, "r", "2021")
    assert list(a["site_id"]) == list(b["site_id"]), "same raster, same ids"
    # A higher threshold (as a model may record) drops the 0.7 site.
    assert len(extract_sites(_raster(tmp_path / "q.tif", _scene(), "0.75"), "r", "2021")) == 1
    # A smaller unit keeps the 0.09 ha blob (a 3 x 3 block survives the opening).
    assert len(extract_sites(src, "r", "2021", mmu_ha=0.05)) == 3


def test_geoparquet_and_view(tmp_path: Path) -> None:
    src = _raster(tmp_path / "p.tif", _scene())
    target = write_sites(extract_sites(src, "r", "2021"), sites_path(tmp_path, "r", "2021"))
    meta = pq.read_metadata(target).metadata
    assert b"covering" in meta[b"geo"] and "bbox" in pq.read_schema(target).names
    refresh_views(tmp_path)
    con = connect(tmp_path / "asmwatch.duckdb", read_only=True)
    rows = con.execute(
        "SELECT site_id, area_ha, ST_Area(ST_Transform(geometry, 'EPSG:4326', 'EPSG:32719', "
        "always_xy := true)) / 1e4 FROM asm_sites ORDER BY area_ha"
    ).fetchall()
    con.close()
    assert [round(r[1]) for r in rows] == [30, 50]
    assert all(abs(r[1] - r[2]) < 0.01 for r in rows), "area_ha is the UTM area"


def test_empty_mask_and_bad_input(tmp_path: Path) -> None:
    empty = extract_sites(_raster(tmp_path / "e.tif", np.zeros((64, 64))), "r", "2021")
    assert len(empty) == 0 and empty.crs.to_epsg() == 4326
    out = write_sites(empty, tmp_path / "e.parquet")
    assert pq.read_table(out).num_rows == 0, "an empty period writes an empty table"
    with pytest.raises(ValueError, match="projected"):
        extract_sites(_raster(tmp_path / "g.tif", _scene(), crs="EPSG:4326"), "r", "2021")
    with pytest.raises(ValueError, match="minimum mapping unit"):
        extract_sites(tmp_path / "e.tif", "r", "2021", mmu_ha=-1)


def test_sites_stream_to_geoparquet_in_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``sites_table`` spills the sites of finished tiles as they come and sorts them into
    the GeoParquet: chunks of two rows and tiles of 128 px give the file one chunk of
    everything gives, with no scratch left beside it; a raster it cannot use leaves the
    old file as it was."""
    import geopandas as gpd
    import shapely

    import pipelines.stages.sites as sites_mod
    from pipelines.stages.sites import sites_table

    rng = np.random.default_rng(4)
    prob = np.zeros((384, 384), np.float32)
    for _ in range(40):  # blobs of 4-14 px, some across the 128 px tile edges
        r, c, h, w = *rng.integers(0, 370, 2), *rng.integers(4, 15, 2)
        prob[r : r + h, c : c + w] = 0.9
    src = _raster(tmp_path / "p.tif", prob)
    out = tmp_path / "sites"
    one = sites_table(src, "r", "2021", out / "one.parquet", mmu_ha=0.05, tile_px=4096)
    monkeypatch.setattr(sites_mod, "READ_ROWS", 2)
    monkeypatch.setattr("pipelines.infra.geotable.READ_ROWS", 2)
    many = sites_table(src, "r", "2021", out / "many.parquet", mmu_ha=0.05, tile_px=128)
    assert one.count == many.count > 20
    a, b = gpd.read_parquet(one.path), gpd.read_parquet(many.path)
    assert a.drop(columns="geometry").equals(b.drop(columns="geometry"))
    assert shapely.equals_exact(a.geometry.values, b.geometry.values, 0).all()
    assert list(a["site_id"]) == sorted(a["site_id"])
    assert pq.read_metadata(many.path).num_row_groups > 10, "written chunk by chunk"
    assert pq.read_metadata(many.path).metadata[b"geo"] == pq.read_metadata(one.path).metadata[b"geo"]  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == ["many.parquet", "one.parquet"]
    before = many.path.read_bytes()
    with pytest.raises(ValueError, match="projected"):
        sites_table(_raster(tmp_path / "g.tif", prob, crs="EPSG:4326"), "r", "2021", many.path)
    assert many.path.read_bytes() == before


def test_the_sites_file_records_the_minimum_mapping_unit_it_was_made_with(tmp_path: Path) -> None:
    """A run may set ``mmu_ha``; the file says which, so the change and the report use
    the unit the sites were mapped with, not the default. An empty table records it too;
    a file that records none (imported, or older) reads as None."""
    import geopandas as gpd

    from pipelines.stages.sites import recorded_mmu, sites_table

    prob = np.zeros((128, 128), np.float32)
    prob[10:20, 10:20] = 0.9  # 1 ha
    prob[60:65, 60:70] = 0.9  # 0.5 ha
    src = _raster(tmp_path / "p.tif", prob)
    small = sites_table(src, "r", "2021", tmp_path / "small.parquet", mmu_ha=0.25)
    large = sites_table(src, "r", "2021", tmp_path / "large.parquet", mmu_ha=0.75)
    none = sites_table(src, "r", "2021", tmp_path / "none.parquet", mmu_ha=5)
    assert (small.count, large.count, none.count) == (2, 1, 0)
    assert (recorded_mmu(small.path), recorded_mmu(large.path), recorded_mmu(none.path)) == (0.25, 0.75, 5.0)  # fmt: skip
    assert gpd.read_parquet(none.path).crs.to_epsg() == 4326, "the empty file is GeoParquet"
    frame = gpd.read_parquet(small.path)
    assert recorded_mmu(write_sites(frame, tmp_path / "imported.parquet")) is None
