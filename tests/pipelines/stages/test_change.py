"""Change between periods: new, expanded, stable, abandoned and re-vegetating areas, with
first-seen periods and a summary with growth factors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import rasterio.features
import shapely
from rasterio.transform import from_origin

from pipelines.infra.grid import bbox_utm_epsg
from pipelines.regions import parse_regions
from pipelines.stages.change import MIN_PART_HA, detect_change, summarise

REGION = parse_regions(
    {
        "regions": [
            {
                "id": "chg",
                "aoi": {"bbox": [-70.56, -13.01, -70.51, -12.965]},
                "periods": [2019, 2020, 2021],
            }
        ]
    }
).regions[0]
EPSG = bbox_utm_epsg(REGION.bbox)
X0, Y0 = 300_000.0, 8_560_000.0  # a corner inside the region, UTM 19S


def box(x: float, y: float, w: float, h: float) -> shapely.Polygon:
    return shapely.box(X0 + x, Y0 + y, X0 + x + w, Y0 + y + h)


def sites(period: str, geoms: dict[str, shapely.Polygon]) -> gpd.GeoDataFrame:
    f = gpd.GeoDataFrame(
        {
            "site_id": list(geoms),
            "region": "chg",
            "period": period,
            "area_ha": [g.area / 1e4 for g in geoms.values()],
            "first_seen_period": [None] * len(geoms),
        },
        geometry=list(geoms.values()),
        crs=EPSG,
    )
    return f.to_crs(4326)


def composite_with_ndvi(path: Path, high: shapely.Polygon) -> Path:
    """A 10 m grid over the test area: NDVI 0.8 inside ``high``, 0.2 elsewhere."""
    transform = from_origin(X0 - 100, Y0 + 1100, 10, 10)
    ndvi = np.full((130, 130), 0.2, np.float32)
    inside = rasterio.features.geometry_mask([high], ndvi.shape, transform, invert=True)
    ndvi[inside] = 0.8
    profile = {"driver": "GTiff", "width": 130, "height": 130, "count": 2, "dtype": "float32", "crs": f"EPSG:{EPSG}", "transform": transform}  # fmt: skip
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(np.stack([ndvi * 0, ndvi]))
        dst.set_band_description(1, "B04")
        dst.set_band_description(2, "NDVI")
    return path


def by_kind(frame: Any) -> dict[str, float]:
    return frame.groupby("kind")["area_ha"].sum().round(4).to_dict()


def test_kinds_areas_first_seen_and_growth(tmp_path: Path) -> None:
    a, b, d = box(0, 0, 200, 200), box(400, 0, 100, 100), box(0, 400, 100, 100)
    s2019 = sites("2019", {"a": a, "b": b, "d": d})
    first = detect_change(REGION, "2019", s2019, None)
    assert by_kind(first.frame) == {"new": 6.0}
    assert set(first.frame["first_seen_period"]) == {"2019"}
    assert "baseline" in first.summary["notes"]

    a2, c = box(0, 0, 300, 200), box(700, 700, 100, 200)  # a grew east by 100 m; c is new
    s2020 = sites("2020", {"a2": a2, "c": c})
    comp = composite_with_ndvi(tmp_path / "2020.tif", b)  # b's land greened, d's did not
    res = detect_change(REGION, "2020", s2020, s2019, previous_change=first.frame, composite=comp)
    areas = by_kind(res.frame)
    assert areas == pytest.approx(
        {"stable": 4.0, "expanded": 2.0, "new": 2.0, "revegetating": 1.0, "abandoned": 1.0},
        abs=1e-3,
    )
    f = res.frame.set_index("kind")
    assert f.loc["stable", "first_seen_period"] == "2019"
    assert (
        f.loc["expanded", "first_seen_period"] == "2020"
        and f.loc["new", "first_seen_period"] == "2020"
    )
    assert f.loc["revegetating", "mean_ndvi"] == pytest.approx(0.8, abs=0.05)
    assert f.loc["abandoned", "mean_ndvi"] == pytest.approx(0.2, abs=0.05)
    assert f.loc["stable", "site_id"] == "a2" and pd_isna(f.loc["abandoned", "site_id"])
    summary = summarise(
        res.summary, first.summary["mining_ha"], ("2019", first.summary["mining_ha"])
    )
    assert summary["mining_ha"] == pytest.approx(8.0) and summary[
        "growth_vs_previous"
    ] == pytest.approx(8 / 6, abs=1e-4)
    assert summary["new_ha"] == pytest.approx(2.0) and summary["revegetating_ha"] == pytest.approx(
        1.0
    )
    # Same inputs, same rows and ids.
    again = detect_change(REGION, "2020", s2020, s2019, previous_change=first.frame, composite=comp)
    assert list(again.frame["change_id"]) == list(res.frame["change_id"])

    # 2021: every site is gone (an empty mask), no composite: the whole footprint of
    # earlier mining (2020's 8 ha and the 2 ha gone in 2020) is abandoned, noted.
    empty = sites("2021", {})
    gone = detect_change(REGION, "2021", empty, s2020, previous_change=res.frame)
    assert by_kind(gone.frame) == pytest.approx({"abandoned": 10.0}, abs=1e-3)
    assert "re-vegetation not assessed" in gone.summary["notes"]
    # Re-vegetation is a state: d, abandoned in 2020, greens by 2021 and shows so then.
    comp21 = composite_with_ndvi(tmp_path / "2021.tif", d)
    later = detect_change(REGION, "2021", empty, s2020, previous_change=res.frame, composite=comp21)
    assert by_kind(later.frame) == pytest.approx({"abandoned": 9.0, "revegetating": 1.0}, abs=1e-3)
    assert set(gone.frame["first_seen_period"]) == {"2019", "2020"}
    assert summarise(gone.summary, 8.0, ("2019", 6.0))["growth_vs_first"] == 0.0


def test_without_previous_change_first_seen_is_a_bound_and_slivers_drop() -> None:
    a = box(0, 0, 200, 200)
    s2019 = sites("2019", {"a": a})
    nudged = box(0, 0.001, 200, 200)  # a sliver of 0.2 m2 differs from 2019
    res = detect_change(REGION, "2020", sites("2020", {"a": nudged}), s2019)
    assert by_kind(res.frame) == pytest.approx({"stable": 4.0}, abs=1e-3)
    assert res.frame["first_seen_period"].tolist() == ["2019"]
    assert "first_seen_period of older mining is a bound" in res.summary["notes"]
    assert MIN_PART_HA <= 0.01


def test_nothing_before_means_no_growth_factor() -> None:
    res = detect_change(
        REGION, "2020", sites("2020", {"a": box(0, 0, 100, 100)}), sites("2019", {})
    )
    assert by_kind(res.frame) == {"new": 1.0}
    assert summarise(res.summary, 0.0, ("2019", 0.0))["growth_vs_previous"] is None


def pd_isna(value: Any) -> bool:
    import pandas as pd

    return bool(pd.isna(value))


def test_gone_mining_outside_the_composite_is_abandoned(tmp_path: Path) -> None:
    """A part beyond the composite's extent, or thinner than a pixel, has no NDVI."""
    comp = composite_with_ndvi(tmp_path / "c.tif", box(0, 0, 1000, 1000))  # all green
    far, thin = box(5000, 5000, 100, 100), box(300, 300, 100, 2)
    res = detect_change(
        REGION, "2020", sites("2020", {}), sites("2019", {"far": far, "thin": thin}), composite=comp,
        mmu_ha=0,  # the thin part (0.02 ha) is below the minimum mapping unit
    )  # fmt: skip
    f = res.frame.sort_values("area_ha")
    assert list(f["kind"]) == ["revegetating", "abandoned"]  # the thin one still has pixels
    assert np.isnan(f["mean_ndvi"].iloc[1])


def test_former_mining_below_the_minimum_mapping_unit_is_not_counted(tmp_path: Path) -> None:
    """Before: 113 'abandoned' polygons of a median 0.01 ha in one demo period: the edge
    jitter between two maps of the same site, drawn on the map and counted."""
    from pipelines.thresholds import MMU_HA

    comp = composite_with_ndvi(tmp_path / "c.tif", box(0, 0, 10, 10))  # bare: NDVI low
    site = box(0, 0, 300, 300)
    shrunk = box(0, 0, 300, 290)  # the same site mapped 10 m shorter: a 0.3 ha strip left
    gone = box(1000, 0, 100, 100)  # a whole 1 ha site gone
    res = detect_change(
        REGION, "2020", sites("2020", {"a": shrunk}), sites("2019", {"a": site, "g": gone}), composite=comp
    )  # fmt: skip
    former = res.frame[res.frame["kind"].isin(["abandoned", "revegetating"])]
    assert list(former["area_ha"].round(3)) == [1.0] and MMU_HA == 0.5
    assert res.summary["abandoned_ha"] == pytest.approx(1.0, abs=1e-3)
    kept = detect_change(
        REGION, "2020", sites("2020", {"a": shrunk}), sites("2019", {"a": site, "g": gone}), composite=comp, mmu_ha=0.2
    )  # fmt: skip
    assert sorted(kept.frame.query("kind == 'abandoned'")["area_ha"].round(3)) == [0.3, 1.0]


def test_former_mining_is_counted_from_the_unit_the_sites_were_mapped_with(tmp_path: Path) -> None:
    """The sites files record their minimum mapping unit (a run may set one); the change
    counts former mining from it, not from the default, and notes when the two periods'
    units differ (using the larger)."""
    from pipelines.infra.geotable import GeoParquetWriter
    from pipelines.stages.change import NOTE_MMU_DIFFERS, change_table
    from pipelines.stages.sites import MMU_KEY

    comp = composite_with_ndvi(tmp_path / "c.tif", box(0, 0, 10, 10))
    site, shrunk = box(0, 0, 300, 300), box(0, 0, 300, 290)  # a 0.3 ha strip left
    gone = box(1000, 0, 100, 100)  # 1 ha

    def put(name: str, frame: gpd.GeoDataFrame, mmu: float | None) -> Path:
        with GeoParquetWriter(tmp_path / name, frame.iloc[:0], {MMU_KEY: str(mmu)} if mmu is not None else None) as out:  # fmt: skip
            out.write(frame)
        return tmp_path / name

    heard: list[str] = []

    def abandoned(cur: float | None, prev: float | None) -> tuple[list[float], list[str]]:
        here = put(f"cur{cur}.parquet", sites("2020", {"a": shrunk}), cur)
        there = put(f"prev{prev}.parquet", sites("2019", {"a": site, "g": gone}), prev)
        heard.clear()
        table = change_table(REGION, "2020", here, there, tmp_path / f"c{cur}{prev}.parquet", composite=comp, progress=heard.append)  # fmt: skip
        rows = gpd.read_parquet(table.path).query("kind == 'abandoned'")
        return sorted(rows["area_ha"].round(3)), [n for n in table.notes if "minimum mapping unit" in n]  # fmt: skip

    assert abandoned(0.2, 0.2) == ([0.3, 1.0], []), "the recorded 0.2 ha, not the default 0.5"
    assert abandoned(None, None)[0] == [1.0], "nothing recorded: the default"
    assert any("record no minimum mapping unit" in m and "0.5 ha" in m for m in heard), (
        "and says so"
    )
    assert abandoned(0.2, None)[0] == [0.3, 1.0]
    areas, notes = abandoned(0.2, 2.0)
    assert areas == [] and len(notes) == 1
    assert notes[0] == NOTE_MMU_DIFFERS.format(previous_period="2019", previous="2", current="0.2", used="2")  # fmt: skip


def _canonical(frame: Any) -> tuple[list[tuple[str, str, str]], np.ndarray]:
    """(kind, geometry digest in normal form, first seen) sorted, and the NDVI means."""
    import hashlib

    g = frame.to_crs(EPSG).geometry.to_numpy()
    g = shapely.normalize(shapely.simplify(shapely.set_precision(g, 0.01), 0))
    digests = [hashlib.sha1(w).hexdigest() for w in shapely.to_wkb(g)]
    rows = list(zip(frame["kind"], digests, frame["first_seen_period"].astype(str), strict=True))
    order = sorted(range(len(rows)), key=rows.__getitem__)
    return [rows[i] for i in order], frame["mean_ndvi"].to_numpy()[order]


def test_indexed_overlay_matches_the_whole_union_overlay(tmp_path: Path) -> None:
    """The STRtree overlay and tiled NDVI reads give the rows of the old code path (one
    overlay per site against the union of everything, a read per part)."""
    from bench._change_baseline import detect_change as whole_union
    from bench.change import REGION as BENCH
    from bench.change import composite, world

    cur, prev, hist = world(400, seed=3)
    comp = composite(tmp_path / "c.tif", 400)
    # mmu_ha=0: former mining of every size, as the old code path kept it (only slivers
    # under a pixel dropped), to compare the overlays themselves.
    new = detect_change(BENCH, "2021", cur, prev, previous_change=hist, composite=comp, mmu_ha=0)
    old = whole_union(BENCH, "2021", cur, prev, previous_change=hist, composite=comp)
    assert len(new.frame) == len(old.frame) > 800
    assert set(new.frame["kind"]) == {"new", "stable", "expanded", "abandoned", "revegetating"}
    (rows_new, ndvi_new), (rows_old, ndvi_old) = _canonical(new.frame), _canonical(old.frame)
    assert rows_new == rows_old
    np.testing.assert_allclose(ndvi_new, ndvi_old, atol=1e-5)  # float64 means, float32 before
    assert new.summary == old.summary


@pytest.mark.parametrize("batch_size", [1, 37])
def test_the_overlay_in_batches_gives_the_rows_of_one_overlay(
    tmp_path: Path, batch_size: int
) -> None:
    """Batches of whole clusters of intersecting boxes (one cluster each, or a few
    dozen geometries) give the same frame and summary as one batch of everything."""
    from bench.change import REGION as BENCH
    from bench.change import composite, world

    cur, prev, hist = world(300, seed=5)
    comp = composite(tmp_path / "c.tif", 300)
    whole = detect_change(BENCH, "2021", cur, prev, previous_change=hist, composite=comp, batch_size=10**9)  # fmt: skip
    part = detect_change(BENCH, "2021", cur, prev, previous_change=hist, composite=comp, batch_size=batch_size)  # fmt: skip
    assert set(whole.frame["kind"]) == {"new", "stable", "expanded", "abandoned", "revegetating"}
    assert part.frame.drop(columns="geometry").equals(whole.frame.drop(columns="geometry"))
    assert shapely.equals_exact(part.frame.geometry.values, whole.frame.geometry.values, 0).all()
    assert part.summary == whole.summary
    # the batches split the work, cover every geometry once, and pack whole clusters
    from bench.change import EPSG as BENCH_EPSG
    from pipelines.stages.change import batch_ids, clusters

    every = np.concatenate([np.asarray(f.to_crs(BENCH_EPSG).geometry) for f in (cur, prev, hist)])
    ids, count = batch_ids(shapely.bounds(every), batch_size)
    assert set(ids.tolist()) == set(range(count))
    for cluster in clusters(every):  # geometries that intersect share a batch
        assert len(set(ids[cluster].tolist())) == 1
    boxes, n_boxes = batch_ids(shapely.bounds(every), 1)  # a batch per cluster of boxes
    assert n_boxes > 50
    for b in range(count):  # full batches, or one cluster of boxes larger than a batch
        members = np.flatnonzero(ids == b)
        assert len(members) <= batch_size or len(set(boxes[members].tolist())) == 1
    if batch_size > 1:
        assert count < n_boxes


def test_an_overlay_batch_size_below_one_is_refused() -> None:
    from pipelines.stages.change import batch_ids

    with pytest.raises(ValueError, match="batch size must be at least 1, got 0"):
        batch_ids(np.empty((0, 4)), 0)


def test_change_tables_stream_from_and_to_geoparquet(tmp_path: Path) -> None:
    """``change_table`` reads its tables in chunks and writes the rows sorted by id:
    the file ``detect_change``'s frame would give, with no scratch left and the summary
    of the frame; chunks of a few rows give the same file."""
    import pyarrow.parquet as pq

    import pipelines.infra.geotable as geotable
    from bench.change import REGION as BENCH
    from bench.change import composite, tables
    from pipelines.stages.change import change_table

    sites, previous, history = tables(tmp_path, 200, seed=2)
    comp = composite(tmp_path / "c.tif", 200)
    out = tmp_path / "out"
    table = change_table(BENCH, "2021", sites, previous, out / "a.parquet", previous_change=history, composite=comp)  # fmt: skip
    frame = gpd.read_parquet(table.path)
    assert len(frame) == table.rows > 300
    assert list(frame["change_id"]) == sorted(frame["change_id"])
    assert sorted(p.name for p in out.iterdir()) == ["a.parquet"], "no scratch left behind"
    areas = frame.groupby("kind")["area_ha"].sum()
    for kind, ha in areas.items():
        assert table.summary[f"{kind}_ha"] == pytest.approx(round(float(ha), 4), abs=1e-9)
    assert table.summary["site_count"] == pq.read_metadata(sites).num_rows
    meta = pq.read_metadata(table.path).metadata
    assert b"covering" in meta[b"geo"] and "bbox" in pq.read_schema(table.path).names
    # the same rows through chunks of 7 rows and batches of 50 geometries
    small = pytest.MonkeyPatch()
    small.setattr(geotable, "READ_ROWS", 7)
    small.setattr("pipelines.stages.change.READ_ROWS", 7)
    try:
        again = change_table(BENCH, "2021", sites, previous, out / "b.parquet", previous_change=history, composite=comp, batch_size=50)  # fmt: skip
    finally:
        small.undo()
    other = gpd.read_parquet(again.path)
    assert other.drop(columns="geometry").equals(frame.drop(columns="geometry"))
    assert shapely.equals_exact(other.geometry.values, frame.geometry.values, 0).all()
    assert again.summary == table.summary
    first = pq.read_metadata(table.path).metadata[b"geo"]
    assert pq.read_metadata(again.path).metadata[b"geo"] == first


def test_change_table_names_a_table_it_cannot_read(tmp_path: Path) -> None:
    """A sites file that is not GeoParquet, or has no CRS, fails in seconds naming the
    file; the change written before is kept and no scratch is left."""
    from pipelines.infra.geotable import GeoTableError
    from pipelines.stages.change import change_table

    good = tmp_path / "sites.parquet"
    sites("2020", {"a": box(0, 0, 100, 100)}).to_parquet(good)
    target = tmp_path / "change" / "2021.parquet"
    target.parent.mkdir()
    target.write_bytes(b"old")
    plain = tmp_path / "plain.parquet"
    sites("2021", {"a": box(0, 0, 100, 100)}).to_wkb().to_parquet(plain)
    with pytest.raises(GeoTableError, match=r"plain\.parquet: not a GeoParquet file"):
        change_table(REGION, "2021", plain, good, target)
    naive = tmp_path / "naive.parquet"
    sites("2021", {"a": box(0, 0, 100, 100)}).set_crs(None, allow_override=True).to_parquet(naive)
    with pytest.raises(GeoTableError, match=r"naive\.parquet: the sites have no CRS"):
        change_table(REGION, "2021", naive, good, target)
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not really")
    with pytest.raises(GeoTableError, match=r"broken\.parquet: not a readable Parquet file"):
        change_table(REGION, "2021", good, broken, target)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in target.parent.iterdir()) == ["2021.parquet"]
