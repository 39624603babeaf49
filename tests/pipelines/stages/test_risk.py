"""Risk SQL against real data: pressure of the real 2025 Amazon Mining Watch detections on
the real SERNANP protected areas and native community lands of Madre de Dios, checked
against an independent geopandas computation."""

from __future__ import annotations

from pathlib import Path

import geopandas as gpd
import pytest

from pipelines.infra.layout import sites_path
from pipelines.regions import parse_regions
from pipelines.stages.catalog import refresh_views
from pipelines.stages.change import detect_change, write_change
from pipelines.stages.context import read_context, write_context
from pipelines.stages.imports import imported_sites, read_detections
from pipelines.stages.risk import compute, write_table
from pipelines.stages.sites import write_sites
from tests.conftest import mdd_context, mdd_department, shared

PERIODS = ("2025Q2", "2025Q3", "2025Q4")


@pytest.fixture(scope="module")
def mdd(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    detections = shared("context/asm_detections_amw_2025_new_sa_aoi.geojson")
    doc = {
        "regions": [
            {
                "id": "madre-de-dios",
                "aoi": {"geometry": mdd_department()},
                "periods": list(PERIODS),
                "context": mdd_context(),
                "detections": {
                    "file": str(detections),
                    "period_field": "amw_period",
                    "mapped_area_field": "Mined area (ha)",
                },
            }
        ]
    }
    region = parse_regions(doc).regions[0]
    root = tmp_path_factory.mktemp("risk")
    for kind in ("protected_areas", "indigenous_lands"):
        write_context(read_context(region, kind, Path(region.context[kind])), root, region.id)
    assert region.detections is not None
    d = read_detections(region.detections)
    previous, history = None, None
    for period in PERIODS:
        sites = imported_sites(region, period, d)
        write_sites(sites, sites_path(root, region.id, period))
        change = detect_change(region, period, sites, previous, previous_change=history)
        write_change(change, root, region.id, period)
        previous, history = sites, change.frame
    refresh_views(root)
    return root, region


@pytest.mark.parametrize("period", PERIODS)
def test_pressure_matches_an_independent_geopandas_overlay(
    mdd: tuple[Path, object], period: str
) -> None:
    root, region = mdd
    rows = compute(root, "protected_area_pressure", region, period).to_pandas()  # type: ignore[arg-type]
    # Expected, from the files themselves: detections of the period clipped to the
    # department, overlaid with each layer in UTM 19S.
    dept = gpd.read_file(shared("reference/boundaries/madre_de_dios_department.geojson"))
    det = gpd.read_file(shared("context/asm_detections_amw_2025_new_sa_aoi.geojson"))
    det = det[det["amw_period"] == period]
    det = gpd.clip(det, dept).to_crs(32719)
    det = det[~det.is_empty]
    layers = {
        "protected": gpd.read_file(shared("context/pe_mdd_anp_sernanp.geojson")).rename(
            columns={"codigo": "area_id"}
        ),
        "indigenous": gpd.read_file(shared("context/pe_mdd_native_communities_amw.geojson")).rename(
            columns={"id": "area_id"}
        ),
    }
    checked = 0
    for kind, layer in layers.items():
        layer = layer.to_crs(32719)
        for _, area in layer.iterrows():
            got = rows[(rows["kind"] == kind) & (rows["area_id"] == area["area_id"])]
            assert len(got) == 1, (kind, area["area_id"])
            touching = det[det.intersects(area.geometry)]
            inside = touching.intersection(area.geometry).area.sum() / 1e4
            assert int(got["site_count"].iloc[0]) == len(touching), area["area_id"]
            assert float(got["asm_area_ha"].iloc[0]) == pytest.approx(inside, rel=1e-3, abs=0.01)
            checked += len(touching) > 0
    assert checked >= 3, "real detections touch several areas"
    assert (rows["share_of_area"].dropna() <= 1.0001).all()


def test_rerun_replaces_rows_and_absent_layers_are_empty(
    mdd: tuple[Path, object], tmp_path: Path
) -> None:
    root, region = mdd
    rows = compute(root, "protected_area_pressure", region, "2025Q3")  # type: ignore[arg-type]
    a = write_table(rows, root, "protected_area_pressure", "madre-de-dios", "2025Q3").read_bytes()
    b = write_table(rows, root, "protected_area_pressure", "madre-de-dios", "2025Q3").read_bytes()
    assert a == b
    # The first period's new ASM is all of it (the baseline); later periods' new ASM
    # comes from asm_change: never more than the ASM inside.
    first = compute(root, "protected_area_pressure", region, "2025Q2").to_pandas()  # type: ignore[arg-type]
    assert first["new_asm_ha"].sum() == pytest.approx(first["asm_area_ha"].sum(), rel=1e-3)
    later = rows.to_pandas()
    assert (later["new_asm_ha"] <= later["asm_area_ha"] + 1e-3).all()
