"""Imported detections: real Amazon Mining Watch polygons reproduce AMW's own figures, and
bad files are refused with errors that name the file and the feature."""

from __future__ import annotations

import csv
import warnings
import zipfile
from pathlib import Path
from typing import Any

import geopandas as gpd
import pytest
import shapely
import shapely.geometry

from pipelines.regions import DetectionsSpec, RegionsError, parse_regions
from pipelines.stages.imports import DetectionsError, imported_sites, read_detections
from tests.conftest import mdd_department, shared

AMW = "reference/amw_mdd_polygons/amw_mdd_bbox_new_mining_by_period_2018_2025Q4.geojson"
YEARS = ("2018", "2019", "2020", "2021", "2022", "2023")


def mdd_region(mode: str) -> Any:
    doc = {
        "regions": [
            {
                "id": "madre-de-dios",
                "aoi": {"geometry": mdd_department()},
                "periods": [int(y) for y in YEARS],
                "detections": {
                    "file": str(shared(AMW)),
                    "mapped_area_field": "mined_area_ha_whole_polygon",
                    "mode": mode,
                },
            }
        ]
    }
    return parse_regions(doc).regions[0]


def amw_figures() -> dict[str, tuple[float, float, int]]:
    """AMW's per-period (mined ha, clipped polygon ha, polygon count) for the department."""
    mined = {
        row["period_code"][:4]: float(row["new_mined_area_ha"])
        for row in csv.DictReader(
            shared("reference/amw_admin_stats/PE17_madre_de_dios_yearly.csv").open()
        )
        if row["period_code"].endswith("00")
    }
    rows = csv.DictReader(shared("reference/amw_mdd_polygons/amw_mdd_area_by_period.csv").open())
    return {
        r["period"]: (mined[r["period"]], float(r["poly_area_ha_mdd_dept"]), int(r["n_polys_mdd"]))
        for r in rows
        if r["period"] in YEARS
    }


@pytest.mark.parametrize("mode", ["presence", "new"])
def test_amw_madre_de_dios_figures_are_reproduced_within_one_percent(mode: str) -> None:
    region = mdd_region(mode)
    assert region.detections is not None
    detections = read_detections(region.detections)
    expected = amw_figures()
    cumulative = 0.0
    for year in YEARS:
        sites = imported_sites(region, year, detections)
        new = sites[sites["first_seen_period"] == year]
        mined, poly_ha, count = expected[year]
        assert len(new) == count
        assert new["mapped_area_ha"].sum() == pytest.approx(mined, rel=0.01)
        assert new["area_ha"].sum() == pytest.approx(poly_ha, rel=0.01)
        cumulative += poly_ha
        if mode == "new":  # a period's sites are all mining seen by then
            assert sites["area_ha"].sum() == pytest.approx(cumulative, rel=0.01)
            assert set(sites["first_seen_period"]) <= set(YEARS[: YEARS.index(year) + 1])
        else:
            assert (sites["period"] == year).all() and len(sites) == count
        # Clipped to the department, stored in EPSG:4326.
        assert sites.crs.to_epsg() == 4326
        aoi = shapely.geometry.shape(region.geometry).buffer(1e-6)
        assert sites.within(aoi).all()
    again = imported_sites(region, "2021", read_detections(region.detections))
    assert list(again["site_id"]) == list(imported_sites(region, "2021", detections)["site_id"])


# --- bad input ------------------------------------------------------------------------


def region_with(path: Path, **kw: Any) -> Any:
    doc = {
        "regions": [
            {
                "id": "test-import",
                "aoi": {"bbox": [-70.6, -13.1, -70.4, -12.9]},
                "periods": [2020, 2021],
                "detections": {"file": str(path), **kw},
            }
        ]
    }
    return parse_regions(doc).regions[0]


def square(lon: float, lat: float, d: float = 0.005) -> shapely.Polygon:
    return shapely.geometry.box(lon, lat, lon + d, lat + d)


def write(tmp_path: Path, name: str, frame: gpd.GeoDataFrame) -> Path:
    p = tmp_path / name
    if p.suffix == ".parquet":
        frame.to_parquet(p)
    else:
        frame.to_file(p)
    return p


def frame(geoms: list[Any], **cols: list[Any]) -> gpd.GeoDataFrame:
    return gpd.GeoDataFrame({"period": ["2020"] * len(geoms), **cols}, geometry=geoms, crs=4326)


def test_good_file_in_each_format_and_a_projected_crs(tmp_path: Path) -> None:
    f = frame([square(-70.5, -13.0), square(-70.45, -12.95)], mined=[1.5, 2.0])
    utm = f.to_crs(32719)
    paths = [
        write(tmp_path, "a.geojson", f),
        write(tmp_path, "a.gpkg", utm),
        write(tmp_path, "a.parquet", utm),
    ]
    (tmp_path / "shp").mkdir()
    utm.to_file(tmp_path / "shp" / "a.shp")
    with zipfile.ZipFile(tmp_path / "a.zip", "w") as z:
        for part in (tmp_path / "shp").iterdir():
            z.write(part, part.name)
    paths.append(tmp_path / "a.zip")
    for p in paths:
        region = region_with(p, mapped_area_field="mined")
        sites = imported_sites(region, "2020", read_detections(region.detections))
        assert len(sites) == 2, p
        assert sites["mapped_area_ha"].sum() == pytest.approx(3.5)
        assert sites["area_ha"].sum() == pytest.approx(
            2 * 0.005**2 * 111.32**2 * 0.974 * 100, rel=0.02
        )
        assert (sites["source"] == f"imported:{p.name}").all()
    assert len(imported_sites(region, "2021", read_detections(region.detections))) == 0


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("points", r"feature 1 is a Point; this layer takes Polygon or MultiPolygon"),
        ("lines", r"feature 0 is a LineString"),
        ("no_crs", r"has no CRS"),
        (
            "no_period",
            r"no period column 'period' \(detections.period_field\).*detections.period \(columns: year\)",
        ),
        ("bad_period", r"feature 1: period: 'last year' is not a period"),
        ("negative_area", r"feature 0: mined is negative"),
        ("text_area", r"column 'mined' must hold numbers"),
        ("all_empty", r"every geometry is empty"),
        ("no_features", r"has no features"),
        ("bad_suffix", r"unsupported format '.csv'"),
        ("missing", r"does not exist"),
        ("garbage", r"cannot be read"),
    ],
)
def test_bad_detection_files_are_refused_by_name(tmp_path: Path, case: str, match: str) -> None:
    sq = square(-70.5, -13.0)
    kw: dict[str, Any] = {}
    if case == "points":
        p = write(tmp_path, "p.geojson", frame([sq, shapely.Point(-70.5, -13.0)]))
    elif case == "lines":
        p = write(tmp_path, "l.geojson", frame([shapely.LineString([(-70.5, -13), (-70.4, -13)])]))
    elif case == "no_crs":
        with warnings.catch_warnings():  # pyogrio warns that the file will have no CRS
            warnings.simplefilter("ignore", UserWarning)
            p = write(tmp_path, "n.gpkg", frame([sq]).set_crs(None, allow_override=True))
    elif case == "no_period":
        p = write(tmp_path, "np.geojson", frame([sq]).rename(columns={"period": "year"}))
    elif case == "bad_period":
        f = frame([sq, sq])
        f["period"] = ["2020", "last year"]
        p = write(tmp_path, "bp.geojson", f)
    elif case in ("negative_area", "text_area"):
        p = write(
            tmp_path, "a.geojson", frame([sq], mined=[-1.0 if case == "negative_area" else "lots"])
        )
        kw = {"mapped_area_field": "mined"}
    elif case == "all_empty":
        p = write(tmp_path, "e.parquet", frame([shapely.Polygon()]))
    elif case == "no_features":
        p = tmp_path / "z.geojson"
        p.write_text('{"type": "FeatureCollection", "features": []}')
    elif case == "bad_suffix":
        p = tmp_path / "d.csv"
        p.write_text("period\n2020\n")
    elif case == "missing":
        p = tmp_path / "absent.geojson"
    else:
        p = tmp_path / "g.geojson"
        p.write_text("{not json")
    region = region_with(p, **kw)
    with pytest.raises(DetectionsError, match=match) as err:
        read_detections(region.detections)
    assert p.name in str(err.value)


def test_invalid_rings_are_repaired_and_empty_ones_skipped(tmp_path: Path) -> None:
    bowtie = shapely.Polygon([(-70.5, -13.0), (-70.49, -12.99), (-70.49, -13.0), (-70.5, -12.99)])
    assert not bowtie.is_valid
    mixed = shapely.GeometryCollection([square(-70.45, -12.95), shapely.Point(-70.4, -12.9)])
    p = write(
        tmp_path, "r.geojson", frame([bowtie, shapely.Polygon(), mixed, square(-70.5, -13.0)])
    )
    region = region_with(p)
    d = read_detections(region.detections)
    assert (d.repaired, d.dropped_empty) == (1, 1)
    assert d.notes == ["1 invalid geometry repaired", "1 empty geometry skipped"]
    sites = imported_sites(region, "2020", d)
    assert len(sites) == 3 and sites.is_valid.all()
    assert set(sites.geom_type) <= {"Polygon", "MultiPolygon"}


def test_regions_file_checks_the_detections_block(tmp_path: Path) -> None:
    base = {"id": "r", "aoi": {"bbox": [-70.6, -13.1, -70.4, -12.9]}, "periods": [2020]}
    with pytest.raises(RegionsError) as err:
        parse_regions(
            {"regions": [{**base, "detections": {"file": "x.geojson", "mode": "all", "colour": 1}}]}
        )
    text = str(err.value)
    assert "detections.mode: 'all' must be one of presence, new" in text
    assert "detections.colour: unknown field" in text
    with pytest.raises(RegionsError, match=r"detections\.file: missing"):
        parse_regions({"regions": [{**base, "detections": {"mode": "new"}}]})
    r = parse_regions(
        {"regions": [{**base, "detections": {"file": "x.geojson"}}]}, base_dir=tmp_path
    )
    assert r.regions[0].detections == DetectionsSpec(path=str(tmp_path / "x.geojson"))
