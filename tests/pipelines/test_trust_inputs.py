"""Inputs that used to give quietly wrong numbers (issue 15): grievance statuses in other
words and languages, and imported detections whose periods are not the region's."""

from __future__ import annotations

import csv
import dataclasses
import shutil
from pathlib import Path
from typing import Any

import geopandas as gpd
import pytest
import shapely
import shapely.geometry

from pipelines.regions import RegionsError, load_regions, parse_regions
from pipelines.stages.context import ContextError, read_context, status_key, write_context
from pipelines.stages.imports import imported_sites, read_detections
from tests.conftest import ROOT, mdd_department, shared

OPEN_WORDS = ["abierto", "pendiente", "en proceso", "Abierta", "Open ", "open\u00a0", "EN TRÁMITE", "en_cours", "Em análise", "ouverte"]  # fmt: skip


def test_status_key_normalises_case_accents_and_spaces() -> None:
    assert status_key(" Abierta\u00a0") == "abierta"
    assert status_key("EN TRÁMITE") == status_key("en tramite") == "en tramite"
    assert status_key("en_proceso") == status_key("en-proceso") == "en proceso"
    assert status_key("Résolu") == "resolu"


def _grievances(tmp_path: Path, statuses: list[str]) -> Path:
    """The demo's real grievance log layout, with an ``estado`` column."""
    path = tmp_path / "quejas.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["grievance_id", "date", "lon", "lat", "category", "concession_id", "estado"])
        for i, s in enumerate(statuses):
            w.writerow([f"G-{i:03d}", "2020-05-01", -70.53, -12.97, "agua", "LSM-001", s])
    return path


def _region(path: Path, **fields: Any) -> Any:
    doc = {
        "regions": [
            {
                "id": "ctx",
                "aoi": {"bbox": [-70.6, -13.1, -70.4, -12.9]},
                "periods": [2020],
                "context": {"grievances": {"file": str(path), "status": "estado", **fields}},
            }
        ]
    }
    return parse_regions(doc).regions[0]


def test_grievance_statuses_in_spanish_french_portuguese_count_as_open(tmp_path: Path) -> None:
    """Before: only the English words counted as open, the rest silently as closed."""
    path = _grievances(tmp_path, [*OPEN_WORDS, "Cerrado", "résolu", "arquivado", ""])
    layer = read_context(_region(path), "grievances", path)
    states = layer.frame["status"].tolist()
    assert states == ["open"] * len(OPEN_WORDS) + ["closed"] * 3 + ["open"]
    assert any("empty status" in n for n in layer.notes)
    # The file's own wording stays in attributes.
    assert '"estado": "EN TRÁMITE"' in layer.frame["attributes"].iloc[6]


def test_an_unknown_status_is_refused_naming_the_row_and_the_value(tmp_path: Path) -> None:
    path = _grievances(tmp_path, ["abierto", "abierto", "en tramite judicial"])
    with pytest.raises(ContextError, match=r"row 4: status 'en tramite judicial' \(estado\).*status_values"):  # fmt: skip
        read_context(_region(path), "grievances", path)
    # Mapped in the regions file, it is taken (matched as normalised text).
    layer = read_context(
        _region(path, status_values={"En Trámite Judicial": "closed"}), "grievances", path
    )
    assert layer.frame["status"].tolist() == ["open", "open", "closed"]


def test_regions_file_checks_status_values() -> None:
    with pytest.raises(RegionsError, match=r"status_values.x: 'maybe' must be one of open, closed"):  # fmt: skip
        _region(Path("g.csv"), status_values={"x": "maybe"})
    with pytest.raises(RegionsError, match=r"status_values: must map"):
        _region(Path("g.csv"), status_values="open")


def test_concession_scores_do_not_drop_with_spanish_statuses(
    demo_run: tuple[Path, str], tmp_path: Path
) -> None:
    """The demo's grievances (no status column: all open) against the same log with
    every status spelt in Spanish: the concession scores are identical."""
    from pipelines.stages.catalog import refresh_views
    from pipelines.stages.risk import compute

    root = tmp_path / "data"
    shutil.copytree(demo_run[0], root, symlinks=True)
    region = load_regions(ROOT / "regions.yaml").get("demo-huepetuhe")
    source = root / "embedded" / region.id / "context" / "grievances.csv"
    before = compute(root, "concession_risk", region, "2021").to_pylist()

    rows = list(csv.DictReader(source.open(encoding="utf-8")))
    spanish = tmp_path / "quejas.csv"
    with spanish.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, [*rows[0], "estado"])
        w.writeheader()
        for i, r in enumerate(rows):
            w.writerow({**r, "estado": ["abierto", "Pendiente", "en proceso", "Abierta "][i % 4]})
    spanish_region = dataclasses.replace(
        region,
        context={**region.context, "grievances": str(spanish)},
        context_fields={**region.context_fields, "grievances": {"status": "estado"}},
    )
    write_context(read_context(spanish_region, "grievances", spanish), root, region.id)
    refresh_views(root)
    after = compute(root, "concession_risk", region, "2021").to_pylist()
    assert any(r["score_grievances"] > 0 for r in before)

    def key(rows: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
        return [(r["concession_id"], r["open_grievances"], r["score"]) for r in rows]

    assert key(after) == key(before)


# Imported detections -----------------------------------------------------------------------

AMW = "reference/amw_mdd_polygons/amw_mdd_bbox_new_mining_by_period_2018_2025Q4.geojson"


def _mdd(periods: list[Any], mode: str = "presence", **detections: Any) -> Any:
    doc = {
        "regions": [
            {
                "id": "madre-de-dios",
                "aoi": {"geometry": mdd_department()},
                "periods": periods,
                "detections": {"file": str(shared(AMW)), "mode": mode, **detections},
            }
        ]
    }
    return parse_regions(doc).regions[0]


def test_a_year_takes_amazon_mining_watchs_quarterly_detections() -> None:
    """Before: region period 2025 over AMW's 2025Q2..Q4 polygons gave 0 sites."""
    region = _mdd([2024, 2025], mapped_area_field="mined_area_ha_whole_polygon")
    det = read_detections(region.detections)
    source = gpd.read_file(shared(AMW))
    aoi = shapely.geometry.shape(region.geometry)
    quarters = source[source["period"].str.startswith("2025Q") & source.intersects(aoi)]
    sites = imported_sites(region, "2025", det)
    assert len(quarters) > 100 and len(sites) == len(quarters)
    assert sites["mapped_area_ha"].sum() == pytest.approx(quarters["mined_area_ha_whole_polygon"].sum())  # fmt: skip
    # The year 2024's own polygons stay in 2024.
    assert len(imported_sites(region, "2024", det)) == int(((source["period"] == "2024") & source.intersects(aoi)).sum())  # fmt: skip
    # mode new: 2025 holds everything up to its end; first seen is the region's period.
    new = _mdd([2024, 2025], mode="new")
    cumulative = imported_sites(new, "2025", read_detections(new.detections))
    assert len(cumulative) == int(source.intersects(aoi).sum())
    assert set(cumulative["first_seen_period"]) >= {"2024", "2025"}
    assert not set(cumulative["first_seen_period"]) & {"2025Q2", "2025Q3", "2025Q4"}


def test_a_year_of_detections_belongs_to_each_quarter_it_spans() -> None:
    region = _mdd(["2023Q1", "2023Q4", "2024Q2"])
    det = read_detections(region.detections)
    source = gpd.read_file(shared(AMW))
    aoi = shapely.geometry.shape(region.geometry)
    n2023 = int(((source["period"] == "2023") & source.intersects(aoi)).sum())
    assert n2023 > 0
    assert len(imported_sites(region, "2023Q1", det)) == n2023
    assert len(imported_sites(region, "2023Q4", det)) == n2023


def test_a_file_without_periods_takes_one_from_the_regions_file(tmp_path: Path) -> None:
    """Amazon Mining Watch's Guinea file has no period column; mapped_area_ha is unknown."""
    from pipelines.infra.layout import sites_path
    from pipelines.stages.sites import write_sites

    guinea = shared("context/asm_detections_amw_guinea_2024.geojson")
    doc = {
        "regions": [
            {
                "id": "siguiri",
                "aoi": {"bbox": [-9.6, 11.2, -9.0, 11.8]},
                "periods": [2024],
                "detections": {"file": str(guinea), "period": 2024},
            }
        ]
    }
    region = parse_regions(doc).regions[0]
    sites = imported_sites(region, "2024", read_detections(region.detections))
    source = gpd.read_file(guinea)
    assert len(sites) == int(source.intersects(shapely.geometry.box(-9.6, 11.2, -9.0, 11.8)).sum()) > 0  # fmt: skip
    path = write_sites(sites, sites_path(tmp_path, region.id, "2024"))
    import pyarrow.parquet as pq

    col = pq.read_table(path).column("mapped_area_ha")
    assert col.null_count == len(sites), "no mapped-area field: unknown (null), not 0"
    # Both a constant period and a period column: refused.
    doc["regions"][0]["detections"]["period_field"] = "x"  # type: ignore[index]
    with pytest.raises(RegionsError, match="either period"):
        parse_regions(doc)
