"""Exports for desktop GIS: a region's GeoParquet tables as GeoPackage, FlatGeobuf and
GeoJSON that Debian's GDAL 3.6 (no Parquet driver) opens."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import geopandas as gpd
import pyarrow as pa
import pyarrow.parquet as pq
import pyogrio
import pytest
import shapely

from pipelines.infra.layout import context_table_path, risk_path, sites_path, summary_path
from pipelines.stages import export as export_mod
from pipelines.stages.export import ExportError, export_region

REGION = "r"


def _root(tmp_path: Path, sites_per_period: int = 5) -> Path:
    """A data root with two periods of sites, summaries, alerts (with a list column)
    and one context layer, as the stages write them (GeoParquet with a bbox column)."""
    root = tmp_path / "data"
    for k, period in enumerate(("2020", "2021")):
        boxes = [
            shapely.box(-70.5 + i * 0.01, -13.0 + k * 0.01, -70.495 + i * 0.01, -12.995 + k * 0.01)
            for i in range(sites_per_period)
        ]
        if period == "2021":  # a later chunk of multipolygons must fit the layer
            boxes[-1] = shapely.MultiPolygon([boxes[-1], shapely.box(-70.4, -12.9, -70.39, -12.89)])
        sites = gpd.GeoDataFrame(
            {
                "site_id": [f"{period}-{i}" for i in range(len(boxes))],
                "region": REGION,
                "period": period,
                "area_ha": [25.0] * len(boxes),
            },
            geometry=boxes,
            crs="EPSG:4326",
        )
        path = sites_path(root, REGION, period)
        path.parent.mkdir(parents=True, exist_ok=True)
        sites.to_parquet(path, write_covering_bbox=True)
        summary = summary_path(root, REGION, period)
        summary.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(
            pa.table({"region": [REGION], "period": [period], "mining_ha": [25.0 * len(boxes)]}),
            summary,
        )
    alerts = gpd.GeoDataFrame(
        {"alert_id": ["a1"], "period": ["2021"], "features": [["park", "concession 7"]]},
        geometry=[shapely.box(-70.5, -13.0, -70.49, -12.99)],
        crs="EPSG:4326",
    )
    path = risk_path(root, "alerts", REGION, "2021")
    path.parent.mkdir(parents=True, exist_ok=True)
    alerts.to_parquet(path, write_covering_bbox=True)
    park = gpd.GeoDataFrame(
        {"feature_id": ["p1"], "name": ["Parque Nacional"], "layer": ["protected_areas"]},
        geometry=[shapely.box(-70.6, -13.1, -70.4, -12.9)],
        crs="EPSG:4326",
    )
    path = context_table_path(root, REGION, "protected_areas")
    path.parent.mkdir(parents=True, exist_ok=True)
    park.to_parquet(path, write_covering_bbox=True)
    return root


@pytest.mark.filterwarnings("error::RuntimeWarning")  # GDAL's warnings of a non-conformant file
def test_geopackage_holds_every_table_as_a_layer(tmp_path: Path) -> None:
    root = _root(tmp_path)
    out = tmp_path / "r.gpkg"
    said: list[str] = []
    result = export_region(root, REGION, ["2020", "2021"], "gpkg", out, say=said.append)
    layers = {row[0]: row[1] for row in pyogrio.list_layers(out)}
    assert layers == {
        "asm_sites": "MultiPolygon",  # polygons and multipolygons: one type for the layer
        "region_summary": None,  # an attribute table
        "alerts": "Polygon",
        "protected_areas": "Polygon",
    }
    sites = pyogrio.read_dataframe(out, layer="asm_sites")
    assert len(sites) == 10 and sorted(set(sites["period"])) == ["2020", "2021"]
    assert "bbox" not in sites.columns and sites.crs.to_epsg() == 4326
    expected = gpd.read_parquet(sites_path(root, REGION, "2020")).geometry
    promoted = [shapely.MultiPolygon([g]) for g in expected]
    assert all(a.equals_exact(b, 1e-12) for a, b in zip(sites.geometry.iloc[:5], promoted, strict=True))  # fmt: skip
    alerts = pyogrio.read_dataframe(out, layer="alerts")
    assert json.loads(alerts["features"].iloc[0]) == ["park", "concession 7"]
    assert pyogrio.read_dataframe(out, layer="region_summary")["mining_ha"].tolist() == [125.0, 125.0]  # fmt: skip
    # What was not materialised is named, not silently absent.
    assert "asm_change 2020" in result.missing and "alerts 2020" in result.missing
    assert {t.name: t.rows for t in result.tables}["asm_sites"] == 10
    assert any("asm_sites: 10 rows" in line for line in said)


@pytest.mark.parametrize("fmt, suffix", [("fgb", ".fgb"), ("geojson", ".geojson")])
def test_folder_formats_write_a_file_per_table(tmp_path: Path, fmt: str, suffix: str) -> None:
    root = _root(tmp_path)
    out = tmp_path / f"r-{fmt}"
    export_region(root, REGION, ["2021"], fmt, out)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([f"asm_sites{suffix}", "region_summary.csv", f"alerts{suffix}", f"protected_areas{suffix}"])  # fmt: skip
    sites = pyogrio.read_dataframe(out / f"asm_sites{suffix}")
    assert len(sites) == 5 and set(sites["period"]) == {"2021"}
    assert (out / "region_summary.csv").read_text().splitlines()[0] == "region,period,mining_ha"


def test_large_tables_go_chunk_by_chunk_and_a_rerun_replaces_the_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _root(tmp_path, sites_per_period=25)
    monkeypatch.setattr(export_mod, "CHUNK_ROWS", 7)
    out = tmp_path / "r.gpkg"
    export_region(root, REGION, ["2020", "2021"], "gpkg", out)
    assert len(pyogrio.read_dataframe(out, layer="asm_sites")) == 50
    export_region(root, REGION, ["2021"], "gpkg", out)  # again, one period: replaced whole
    assert len(pyogrio.read_dataframe(out, layer="asm_sites")) == 25
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_nothing_to_export_and_unknown_formats_are_named(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"nothing to export for region 'r' .*asmwatch run r"):
        export_region(tmp_path, REGION, ["2020"], "gpkg", tmp_path / "x.gpkg")
    with pytest.raises(ExportError, match="unknown export format 'shp': use one of gpkg, fgb, geojson"):  # fmt: skip
        export_region(_root(tmp_path), REGION, ["2020"], "shp", tmp_path / "x.shp")
    assert not (tmp_path / "x.gpkg").exists()


@pytest.mark.skipif(shutil.which("ogrinfo") is None, reason="Debian's ogrinfo (gdal-bin) is not installed; make test installs it")  # fmt: skip
@pytest.mark.parametrize("fmt", ["gpkg", "fgb", "geojson"])
def test_debian_ogrinfo_opens_the_export(tmp_path: Path, fmt: str) -> None:
    """The system GDAL (3.6 on Debian 12, as QGIS there uses), not the wheel's, opens it."""
    root = _root(tmp_path)
    out = tmp_path / ("r.gpkg" if fmt == "gpkg" else f"r-{fmt}")
    export_region(root, REGION, ["2020", "2021"], fmt, out)
    target = out if fmt == "gpkg" else out / f"asm_sites.{fmt}"
    info = subprocess.run(["ogrinfo", "-so", "-al", str(target)], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert info.returncode == 0, info.stderr
    assert "partially supported" not in info.stderr, info.stderr  # GeoPackage 1.2, not 1.4
    text = info.stdout
    assert "Feature Count: 10" in text or "Feature Count: 5" in text, text
    assert "WGS 84" in text or "4326" in text, text
    if fmt == "gpkg":
        assert "Layer name: asm_sites" in text and "Layer name: region_summary" in text
