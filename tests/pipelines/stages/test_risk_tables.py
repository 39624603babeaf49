"""concession_risk, hotspots and alerts on a hand-made world whose answers are known."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import geopandas as gpd
import h3
import pytest
import shapely
from pyproj import Transformer

from pipelines.infra.layout import risk_path, sites_path
from pipelines.regions import parse_regions
from pipelines.stages.catalog import connect, refresh_views
from pipelines.stages.change import detect_change, write_change
from pipelines.stages.context import read_context, write_context
from pipelines.stages.risk import RiskError, RiskSettings, compute, write_table
from pipelines.stages.sites import COLUMNS, conform, write_sites

HOSTILE = "Reserva'); DROP VIEW asm_sites; --"  # a name as an attacker would write it
X0, Y0 = 330_000.0, 8_560_000.0  # UTM 19S, near -70.56, -13.03
TO_LL = Transformer.from_crs(32719, 4326, always_xy=True).transform


def box(x: float, y: float, w: float, h: float) -> shapely.Polygon:
    return shapely.box(X0 + x, Y0 + y, X0 + x + w, Y0 + y + h)


def pt(x: float, y: float) -> shapely.Point:
    return shapely.Point(X0 + x, Y0 + y)


def ll(geom: Any) -> Any:
    return shapely.transform(geom, TO_LL, interleaved=False)


def layer(path: Path, geoms: list[Any], **cols: list[Any]) -> str:
    gpd.GeoDataFrame(cols, geometry=[ll(g) for g in geoms], crs=4326).to_file(path)
    return str(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    d = tmp_path_factory.mktemp("risk-world")
    context = {
        "concessions": layer(
            d / "c.geojson",
            [box(0, 0, 1000, 1000)],
            concession_id=["C1"],
            name=["Mina Grande"],
            holder=["LSM Co"],
        ),
        "protected_areas": layer(
            d / "p.geojson", [box(3900, -500, 1000, 1000)], area_id=["PA1"], name=[HOSTILE]
        ),
        "indigenous_lands": layer(
            d / "i.geojson", [box(-3000, 0, 500, 500)], area_id=["IL1"], name=["Comunidad"]
        ),
        "settlements": layer(
            d / "s.geojson", [pt(-1000, 500), pt(500, 3000), pt(20000, 0)], name=["A", "B", "far"]
        ),
        "grievances": str(d / "g.csv"),
    }
    g1, g3, g4 = (TO_LL(X0 + 200, Y0 + 200), TO_LL(X0 + 1500, Y0 + 500), TO_LL(X0 + 300, Y0 + 300))
    (d / "g.csv").write_text(
        "grievance_id,date,lon,lat,category,status,concession_id\n"
        f"G1,2020-03-01,{g1[0]},{g1[1]},water,open,C1\n"
        f"G2,2020-04-01,{g1[0]},{g1[1]},land,closed,C1\n"
        f"G3,2020-05-01,{g3[0]},{g3[1]},noise,open,\n"
        f"G4,2021-02-01,{g4[0]},{g4[1]},water,open,C1\n"
    )
    w, s = TO_LL(X0 - 12000, Y0 - 12000)
    e, n = TO_LL(X0 + 12000, Y0 + 12000)
    doc = {
        "regions": [
            {
                "id": "riskw",
                "aoi": {"bbox": [w, s, e, n]},
                "periods": [2019, 2020],
                "context": context,
            }
        ]
    }
    region = parse_regions(doc).regions[0]
    root = d / "root"
    for kind in context:
        write_context(read_context(region, kind, Path(region.context[kind])), root, region.id)
    inside, near, mid, far = (
        box(400, 400, 200, 200),
        box(1500, 450, 100, 100),
        box(4000, 0, 100, 100),
        box(9000, 0, 100, 100),
    )
    write_periods(root, region, [("2019", {"in": inside}), ("2020", {"in": inside, "near": near, "mid": mid, "far": far})])  # fmt: skip
    return root, region


def write_periods(root: Path, region: Any, periods: list[tuple[str, dict[str, Any]]]) -> None:
    """Sites (UTM boxes by id) of each period, their change against the period before,
    and the catalog's views."""
    previous, history = None, None
    for period, geoms in periods:
        sites = gpd.GeoDataFrame(
            {"site_id": list(geoms), "region": region.id, "period": period,
             "area_ha": [g.area / 1e4 for g in geoms.values()], "mean_probability": 0.9,
             "mapped_area_ha": float("nan"), "first_seen_period": None, "source": "test"},
            geometry=[ll(g) for g in geoms.values()], crs=4326,
        )  # fmt: skip
        sites = conform(sites[list(COLUMNS)])
        write_sites(sites, sites_path(root, region.id, period))
        change = detect_change(region, period, sites, previous, previous_change=history)
        write_change(change, root, region.id, period)
        previous, history = sites, change.frame
    refresh_views(root)


def test_concession_risk_components_and_score(world: tuple[Path, Any]) -> None:
    root, region = world
    (row,) = compute(root, "concession_risk", region, "2020").to_pylist()
    assert row["concession_id"] == "C1" and row["holder"] == "LSM Co"
    assert row["asm_inside_ha"] == pytest.approx(4.0, abs=1e-3)
    assert (row["asm_0_1km_ha"], row["asm_1_5km_ha"], row["asm_5_10km_ha"]) == pytest.approx(
        (1.0, 1.0, 1.0), abs=1e-3
    )
    assert row["new_asm_ha"] == pytest.approx(3.0, abs=1e-3)
    assert row["growth_rate"] == pytest.approx(7 / 4, abs=1e-3) and row["nearest_asm_m"] == 0
    assert (row["settlements_nearby"], row["communities_nearby"], row["open_grievances"]) == (
        2,
        1,
        2,
    )
    parts = {k: row[k] for k in row if k.startswith("score_")}
    assert parts == pytest.approx(
        {
            "score_inside": 12.0,
            "score_proximity": 1.7,
            "score_new": 12.0,
            "score_growth": 7.5,
            "score_people": 10.0,
            "score_grievances": 6.67,
        },
        abs=0.01,
    )
    assert row["score"] == pytest.approx(sum(parts.values()), abs=0.1) and row["band"] == "medium"
    (first,) = compute(root, "concession_risk", region, "2019").to_pylist()
    assert first["growth_rate"] is None and first["open_grievances"] == 0  # G1 is from 2020


def test_hotspots_cells_hold_every_site(world: tuple[Path, Any]) -> None:
    root, region = world
    rows = compute(root, "hotspots", region, "2020", RiskSettings(h3_resolution=8)).to_pylist()
    assert sum(r["asm_area_ha"] for r in rows) == pytest.approx(7.0, abs=1e-3)
    assert sum(r["new_asm_ha"] for r in rows) == pytest.approx(3.0, abs=1e-3)
    assert sum(r["site_count"] for r in rows) == 4 and all(
        h3.is_valid_cell(r["h3_cell"]) for r in rows
    )
    sites = gpd.read_parquet(sites_path(root, "riskw", "2020"))
    expected = {h3.latlng_to_cell(p.y, p.x, 8) for p in sites.geometry.representative_point()}
    assert {r["h3_cell"] for r in rows} == expected
    path = write_table(compute(root, "hotspots", region, "2020"), root, "hotspots", "riskw", "2020")
    cells = gpd.read_parquet(path)
    assert cells.crs.to_epsg() == 4326 and cells.geom_type.eq("Polygon").all()


def test_alerts_kinds_severity_and_no_duplicates(world: tuple[Path, Any]) -> None:
    """One alert per change area: the 'mid' site, inside the protected area and 3 km from
    the concession, is one alert with both relations, as severe as the worse of them."""
    root, region = world
    t = dt.datetime(2026, 11, 22, tzinfo=dt.UTC)
    features = compute(root, "alert_features", region, "2020", now=t).to_pylist()
    got = sorted(
        (r["kind"], r["relation"], r["severity"], round(r["distance_m"])) for r in features
    )
    assert got == [
        ("in_protected_area", "inside", "high", 0),
        ("near_concession", "within", "high", 500),
        ("near_concession", "within", "medium", 3000),
    ]
    rows = compute(root, "alerts", region, "2020", now=t).to_pylist()
    assert len(rows) == 2 == len({r["change_id"] for r in features})
    assert [r["rank"] for r in rows] == [1, 2] and [r["alert_ref"] for r in rows] == ["2020-001", "2020-002"]  # fmt: skip
    assert all(r["listed"] and r["severity"] == "high" for r in rows)
    mid = next(r for r in rows if r["feature_count"] == 2)
    assert mid["kinds"] == ["in_protected_area", "near_concession"]
    assert (mid["concessions"], mid["protected_areas"], mid["indigenous_lands"]) == (1, 1, 0)
    assert mid["nearest_concession_m"] == pytest.approx(3000, abs=1)
    assert mid["summary"] == (
        f"new, 1.00 ha: inside {HOSTILE} (protected area, 1.00 ha); 3000 m from concession Mina Grande"
    )
    assert {r["alert_id"] for r in rows} == {r["alert_id"] for r in features}
    wide = compute(
        root, "alerts", region, "2020", RiskSettings(alert_distance_m=10_000)
    ).to_pylist()
    assert len(wide) == 3  # the 8 km site too
    capped = compute(root, "alerts", region, "2020", RiskSettings(alert_distance_m=10_000, max_alerts=1)).to_pylist()  # fmt: skip
    assert [r["listed"] for r in capped] == [True, False, False]  # all kept, one listed
    for _ in range(2):  # re-running the period replaces its alerts
        write_table(compute(root, "alerts", region, "2020"), root, "alerts", "riskw", "2020")
    refresh_views(root)
    con = connect(root / "asmwatch.duckdb", read_only=True)
    n, distinct = con.execute(
        "SELECT count(*), count(DISTINCT alert_id) FROM alerts WHERE region = ?", ["riskw"]
    ).fetchone()  # type: ignore[misc]
    con.close()
    assert n == distinct == 2
    # Text from a context layer travels as data, never as SQL: the name comes back whole
    # and the views are all still there.
    assert HOSTILE in {r["feature_name"] for r in features}
    con = connect(root / "asmwatch.duckdb", read_only=True)
    views = {r[0] for r in con.execute("SELECT view_name FROM duckdb_views()").fetchall()}
    con.close()
    assert {"asm_sites", "asm_change", "alerts", "protected_areas"} <= views
    again = compute(root, "alerts", region, "2020").to_pylist()
    assert sorted(r["alert_id"] for r in again) == sorted(r["alert_id"] for r in rows)
    assert compute(root, "alerts", region, "2019").num_rows == 0  # the baseline period
    with pytest.raises(RiskError, match="alert distance"):
        compute(root, "alerts", region, "2020", RiskSettings(alert_distance_m=-1))
    with pytest.raises(RiskError, match="max_alerts must be at least 1"):
        compute(root, "alerts", region, "2020", RiskSettings(max_alerts=0))


def test_a_patch_touching_three_concessions_is_one_alert(tmp_path: Path) -> None:
    """Before: one alert per change area and feature, so a patch near three concessions
    raised three, and one inside a concession (0 m) was 'near' it."""
    context = {
        "concessions": layer(
            tmp_path / "c.geojson",
            [box(0, 0, 1000, 1000), box(1300, 0, 500, 500), box(-2000, 0, 500, 500)],
            concession_id=["A", "B", "C"], name=["Alfa", "Bravo", "Charlie"], holder=["x", "y", "z"],
        ),
    }  # fmt: skip
    w, s = TO_LL(X0 - 12000, Y0 - 12000)
    e, n = TO_LL(X0 + 12000, Y0 + 12000)
    doc = {"regions": [{"id": "crowd", "aoi": {"bbox": [w, s, e, n]}, "periods": [2019, 2020], "context": context}]}  # fmt: skip
    region = parse_regions(doc).regions[0]
    root = tmp_path / "root"
    write_context(
        read_context(region, "concessions", Path(context["concessions"])), root, region.id
    )
    far = box(-9000, -9000, 100, 100)  # the baseline's only site
    patch = box(900, 100, 300, 300)  # 9 ha, 3 ha of it inside A, 100 m from B, 2.4 km from C
    write_periods(root, region, [("2019", {"far": far}), ("2020", {"far": far, "patch": patch})])
    (alert,) = compute(root, "alerts", region, "2020").to_pylist()
    assert alert["severity"] == "critical" and alert["feature_count"] == 3
    assert alert["kinds"] == ["in_concession", "near_concession"]
    assert alert["summary"] == (
        "new, 9.00 ha: inside Alfa (concession, 3.00 ha); 100 m from concession Bravo; "
        "2400 m from concession Charlie"
    )
    features = compute(root, "alert_features", region, "2020").to_pylist()
    by_id = {r["feature_id"]: r for r in features}
    assert (by_id["A"]["kind"], by_id["A"]["relation"], by_id["A"]["severity"]) == ("in_concession", "inside", "critical")  # fmt: skip
    assert by_id["A"]["overlap_ha"] == pytest.approx(3.0, abs=1e-3)
    assert (by_id["B"]["relation"], by_id["B"]["severity"], round(by_id["B"]["distance_m"])) == ("within", "high", 100)  # fmt: skip
    assert (by_id["C"]["severity"], by_id["B"]["overlap_ha"]) == ("medium", None)


def test_a_region_without_layers_gets_empty_tables(world: tuple[Path, Any]) -> None:
    root, region = world
    import dataclasses

    bare = dataclasses.replace(region, id="bare")  # no context files, no sites under this id
    assert compute(root, "concession_risk", bare, "2020").num_rows == 0
    assert compute(root, "alerts", bare, "2020").num_rows == 0


def test_the_alerts_files_record_the_settings_they_were_computed_with(
    world: tuple[Path, Any], tmp_path: Path
) -> None:
    """A run may set ``alert_distance_m`` and ``min_alert_ha``; the alerts and
    alert_features files record which (streamed by DuckDB, or written empty), so the
    report states them and not the defaults."""
    import shutil

    from pipelines.stages.risk import recorded_settings, write_rows

    root = tmp_path / "data"
    shutil.copytree(world[0], root)
    refresh_views(root)
    region = world[1]
    wide = RiskSettings(alert_distance_m=10_000, min_alert_ha=0.25)
    for period, rows in (("2020", 3), ("2019", 0)):  # the baseline period has no alerts
        path = write_rows(root, "alerts", region, period, wide)
        assert pq_rows(path) == rows
        for table in ("alerts", "alert_features"):
            got = recorded_settings(risk_path(root, table, region.id, period))
            assert got == {"alert_distance_m": 10_000.0, "min_alert_ha": 0.25}, (table, period)
    assert gpd.read_parquet(path).crs.to_epsg() == 4326, "still GeoParquet"
    default = write_rows(root, "alerts", region, "2020")
    assert recorded_settings(default) == {"alert_distance_m": 5000.0, "min_alert_ha": 0.5}
    assert pq_rows(default) == 2


def pq_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return int(pq.read_metadata(path).num_rows)
