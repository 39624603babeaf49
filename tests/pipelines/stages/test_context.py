"""Context layers: real SERNANP protected areas and native community lands, the demo's
layers through the asset and DuckDB, and bad files refused by name."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pytest
import shapely
import yaml

from pipelines.regions import parse_regions
from pipelines.stages.context import ContextError, read_context
from tests.conftest import materialize, mdd_context, mdd_department, shared

BBOX = [-70.6, -13.1, -70.4, -12.9]


def region(
    context: dict[str, Any], aoi: dict[str, Any] | None = None, base: Path | None = None
) -> Any:
    doc = {
        "regions": [
            {"id": "ctx", "aoi": aoi or {"bbox": BBOX}, "periods": [2020], "context": context}
        ]
    }
    return parse_regions(doc, base_dir=base).regions[0]


def test_real_protected_areas_and_native_communities() -> None:
    anp = shared("context/pe_mdd_anp_sernanp.geojson")
    native = shared("context/pe_mdd_native_communities_amw.geojson")
    r = region(mdd_context(), aoi={"geometry": mdd_department()})
    pa = read_context(r, "protected_areas", anp).frame
    source = gpd.read_file(anp).set_index("codigo")
    assert sorted(pa["feature_id"]) == ["PN03", "PN08", "PN11", "RC03", "RC06", "RN09"]
    for _, row in pa.iterrows():
        # SERNANP's clipped polygons; its own mdd_ha, computed in UTM 19S too.
        assert row["area_ha"] == pytest.approx(source.loc[row["feature_id"], "mdd_ha"], rel=0.02)
        assert (
            json.loads(row["attributes"])["total_ha"] == source.loc[row["feature_id"], "total_ha"]
        )
    assert set(pa["category"]) == {"Parque Nacional", "Reserva Nacional", "Reserva Comunal"}
    il = read_context(r, "indigenous_lands", native).frame
    assert len(il) == 13 and il["feature_id"].is_unique and il["name"].notna().all()
    assert (il.geom_type.isin(["Polygon", "MultiPolygon"])).all() and il.crs.to_epsg() == 4326


def test_demo_layers_through_the_asset_and_duckdb(tmp_path: Path) -> None:
    from assets.context import context_layers
    from pipelines.stages.catalog import connect
    from tests.assets.test_composite_asset import _regions_file, _resources

    regions = _regions_file(tmp_path)
    doc = yaml.safe_load(regions.read_text())
    doc["regions"][0]["context"] = {
        kind: f"embedded:context/{kind}.{'csv' if kind == 'grievances' else 'geojson'}"
        for kind in (
            "concessions",
            "protected_areas",
            "indigenous_lands",
            "settlements",
            "grievances",
        )
    }
    regions.write_text(yaml.safe_dump(doc))
    result = materialize(
        [context_layers], partition_key="demo-huepetuhe", resources=_resources(tmp_path, regions)
    )
    assert result.success
    meta = {
        k: v.value
        for k, v in result.asset_materializations_for_node("context_layers")[0].metadata.items()
    }
    assert meta["concessions_count"] == 3 and meta["settlements_count"] == 3
    assert "every grievance is taken as open" in str(meta["layers"])
    con = connect(tmp_path / "data" / "asmwatch.duckdb", read_only=True)
    conc = con.execute(
        "SELECT feature_id, name, holder, area_ha FROM concessions ORDER BY 1"
    ).fetchall()
    griev = con.execute(
        "SELECT count(*), min(date), typeof(min(date)), count(*) FILTER (WHERE status = 'open'), "
        "count(DISTINCT concession_id) FROM grievances WHERE region = ?",
        ["demo-huepetuhe"],
    ).fetchone()
    con.close()
    assert [c[0] for c in conc] == ["LSM-001", "LSM-002", "LSM-003"] and all(c[3] > 0 for c in conc)
    assert griev is not None and griev[0] > 0 and griev[2] == "DATE" and griev[3] == griev[0]
    assert griev[4] >= 1


def poly(i: int = 0) -> shapely.Polygon:
    return shapely.box(-70.55 + 0.01 * i, -13.0, -70.545 + 0.01 * i, -12.995)


def gdf(geoms: list[Any], **cols: list[Any]) -> gpd.GeoDataFrame:
    base = {
        "id": [f"a{i}" for i in range(len(geoms))],
        "name": [f"n{i}" for i in range(len(geoms))],
    }
    return gpd.GeoDataFrame({**base, **cols}, geometry=geoms, crs=4326)


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("no_crs", "has no CRS"),
        ("points_as_areas", r"feature 1 is a Point; this layer takes Polygon or MultiPolygon"),
        ("missing_mapped", r"no column 'nombre' \(context.protected_areas.name\); it has id, name"),
        ("no_name", r"no name column; map one with context.protected_areas.name"),
        ("empty_file", "has no features"),
        ("empty_geometry", "feature 1 has an empty geometry"),
        ("duplicate_ids", r"id 'a0' is used by features 0 and 1"),
        ("csv_for_polygons", "CSV takes points"),
        ("csv_text_coords", r"row 3: coordinates \('west', '-13.0'\) are not numbers"),
        ("csv_swapped", r"row 2: \(-13.0, -170.5\) is outside .* swapped"),
        ("csv_bad_date", r"row 2: date '13/05/2019' is not an ISO date"),
        ("csv_no_coords", "no coordinate columns"),
        ("csv_bad_crs", "context.grievances.crs 'EPSG:99999' is not a CRS"),
        ("bad_population", "population 'many' is not a number"),
    ],
)
def test_bad_context_files_are_refused_by_name(tmp_path: Path, case: str, match: str) -> None:
    kind, fields = "protected_areas", {}
    p = tmp_path / "layer.geojson"
    csv_head = "grievance_id,date,lon,lat,category\n"
    if case == "no_crs":
        p = tmp_path / "layer.gpkg"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            gdf([poly()]).set_crs(None, allow_override=True).to_file(p)
    elif case == "points_as_areas":
        gdf([poly(), shapely.Point(-70.5, -13.0)]).to_file(p)
    elif case == "missing_mapped":
        gdf([poly()]).to_file(p)
        fields = {"name": "nombre"}
    elif case == "no_name":
        gdf([poly()]).drop(columns="name").to_file(p)
    elif case == "empty_file":
        p.write_text('{"type": "FeatureCollection", "features": []}')
    elif case == "empty_geometry":
        p = tmp_path / "layer.parquet"
        gdf([poly(), shapely.Polygon()]).to_parquet(p)
    elif case == "duplicate_ids":
        gdf([poly(0), poly(1)], id=["a0", "a0"]).to_file(p)
    elif case == "csv_for_polygons":
        p = tmp_path / "areas.csv"
        p.write_text("id,name,lon,lat\na,b,-70.5,-13.0\n")
    elif case.startswith("csv_"):
        kind = "grievances"
        p = tmp_path / "grievances.csv"
        rows = {
            "csv_text_coords": "g1,2019-05-13,-70.5,-13.0,water\ng2,2019-05-14,west,-13.0,water\n",
            "csv_swapped": "g1,2019-05-13,-13.0,-170.5,water\n",
            "csv_bad_date": "g1,13/05/2019,-70.5,-13.0,water\n",
            "csv_no_coords": "g1,2019-05-13,-70.5,-13.0,water\n",
            "csv_bad_crs": "g1,2019-05-13,-70.5,-13.0,water\n",
        }[case]
        head = csv_head.replace("lon,lat", "x_utm,y_utm") if case == "csv_no_coords" else csv_head
        p.write_text(head + rows)
        if case == "csv_bad_crs":
            fields = {"crs": "EPSG:99999"}
    elif case == "bad_population":
        kind = "settlements"
        gdf([shapely.Point(-70.5, -13.0)], population=["many"]).to_file(p)
    r = region({kind: {"file": str(p), **fields}})
    with pytest.raises(ContextError, match=match) as err:
        read_context(r, kind, p)
    assert p.name in str(err.value)


def test_repairs_projected_csv_and_hostile_text(tmp_path: Path) -> None:
    bowtie = shapely.Polygon([(-70.55, -13.0), (-70.54, -12.99), (-70.54, -13.0), (-70.55, -12.99)])
    hostile = "Reserva'; DROP TABLE concessions; --"
    p = tmp_path / "pa.geojson"
    gdf([bowtie, poly(3)], name=[hostile, "ok"]).to_crs(32719).to_file(p)  # projected file
    far = tmp_path / "far.geojson"
    gdf([poly(0), shapely.box(-60, -5, -59.9, -4.9)]).to_file(far)
    g = tmp_path / "g.csv"  # UTM 19S coordinates of a point near -70.5, -13.0
    g.write_text(
        "id,date,easting,northing,category,status\ng1,2020-02-03,337000,8562000,dust,closed\n"
    )
    r = region(
        {
            "protected_areas": str(p),
            "indigenous_lands": str(far),
            "grievances": {
                "file": str(g),
                "lon": "easting",
                "lat": "northing",
                "crs": "EPSG:32719",
            },
        }
    )
    pa = read_context(r, "protected_areas", p)
    assert pa.notes == ["1 invalid geometry repaired"] and pa.frame.is_valid.all()
    assert hostile in set(pa.frame["name"]) and pa.frame.crs.to_epsg() == 4326
    il = read_context(r, "indigenous_lands", far)
    assert len(il.frame) == 1 and il.dropped_far == 1
    gr = read_context(r, "grievances", g).frame
    pt = gr.geometry.iloc[0]
    assert -70.6 < pt.x < -70.4 and -13.1 < pt.y < -12.9 and gr["status"].iloc[0] == "closed"
    assert str(gr["date"].iloc[0]) == "2020-02-03"


def test_regions_file_checks_context_mappings() -> None:
    from pipelines.regions import RegionsError

    with pytest.raises(RegionsError) as err:
        region(
            {
                "protected_areas": {"file": "a.geojson", "colour": "c", "name": 3},
                "grievances": {"id": "g"},
            }
        )
    text = str(err.value)
    assert (
        "context.protected_areas.colour: unknown field (known: file, crs, id, name, category)"
        in text
    )
    assert "context.protected_areas.name: must be a column name" in text
    assert "context.grievances: must be a file path" in text
    r = region({"concessions": {"file": "c.geojson", "holder": "titular"}}, base=Path("/data"))
    assert r.context["concessions"] == "/data/c.geojson" and r.context_fields["concessions"] == {
        "holder": "titular"
    }


def test_pressure_asset_on_the_demo_layers(tmp_path: Path) -> None:
    """context_layers, then sites (imported), change and protected_area_pressure in Dagster."""
    from assets.change import asm_change
    from assets.context import context_layers
    from assets.detection import asm_sites
    from assets.partitions import partition_key
    from assets.risk import protected_area_pressure
    from pipelines.stages.catalog import connect
    from tests.assets.test_composite_asset import _regions_file, _resources

    regions = _regions_file(tmp_path)
    doc = yaml.safe_load(regions.read_text())
    doc["regions"][0]["context"] = {
        "protected_areas": "embedded:context/protected_areas.geojson",
        "indigenous_lands": "embedded:context/indigenous_lands.geojson",
    }
    regions.write_text(yaml.safe_dump(doc))
    res = _resources(tmp_path, regions)
    assert materialize([context_layers], partition_key="demo-huepetuhe", resources=res).success
    pa = gpd.read_parquet(
        tmp_path / "data" / "context" / "demo-huepetuhe" / "protected_areas.parquet"
    )
    # One detection straddling the protected area's edge, one well inside it.
    area = pa.geometry.iloc[0]
    inner = area.representative_point().buffer(0.001, cap_style="square")
    aoi = shapely.box(-70.55, -13.00, -70.525, -12.975).buffer(-0.002)  # the test region's
    ring = shapely.get_exterior_ring(shapely.get_parts(area)[0])
    points = (ring.interpolate(f, normalized=True) for f in np.linspace(0, 1, 200))
    edge = next(p for p in points if aoi.contains(p)).buffer(0.001, cap_style="square")
    gpd.GeoDataFrame({"period": ["2019", "2019"]}, geometry=[inner, edge], crs=4326).to_file(
        tmp_path / "det.geojson"
    )
    doc["regions"][0]["detections"] = {"file": "det.geojson"}
    regions.write_text(yaml.safe_dump(doc))
    key = partition_key("demo-huepetuhe", "2019")
    result = materialize(
        [asm_sites, asm_change, protected_area_pressure], partition_key=key, resources=res
    )
    assert result.success
    con = connect(tmp_path / "data" / "asmwatch.duckdb", read_only=True)
    rows = con.execute(
        "SELECT kind, site_count, asm_area_ha, intersecting_sites_ha, new_asm_ha FROM "
        "protected_area_pressure WHERE region = ? AND period = ? ORDER BY kind",
        ["demo-huepetuhe", "2019"],
    ).fetchall()
    con.close()
    (ind, prot) = rows
    assert ind[0] == "indigenous" and prot[0] == "protected" and prot[1] == 2
    # Inside: all of the inner square and about half of the edge one.
    assert prot[3] > prot[2] > prot[3] * 0.6 and prot[4] == pytest.approx(prot[2], rel=1e-3)
