"""Careless input, case by case: regions files, context layers, mining labels, imported
detections and STAC items. Each case must fail with an error that names the input (the
field, the file, the feature or the item) and the problem; the writers' guarantee that
nothing already written is lost is checked at the end through the real assets."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pytest
import shapely
from affine import Affine
from rasterio.crs import CRS

from pipelines.regions import DetectionsSpec, RegionsError, parse_regions
from pipelines.stages.context import ContextError, read_context
from pipelines.stages.imports import DetectionsError, read_detections
from pipelines.stages.stac.normalize import NormalizeError, normalize_item

ROOT = Path(__file__).resolve().parent.parent
BASE = {"id": "r", "aoi": {"bbox": [-70.56, -13.01, -70.51, -12.965]}, "periods": [2020, 2021]}
POLY = shapely.box(-70.55, -13.0, -70.54, -12.99)
POINT = shapely.Point(-70.55, -13.0)

# ---------------------------------------------------------------- regions files (19)

REGIONS: list[tuple[str, dict[str, Any], str]] = [
    ("bbox west > east", {"aoi": {"bbox": [1, 0, 0, 1]}}, "aoi.bbox: west (1.0) must be less than east (0.0)"),
    ("latitude out of range", {"aoi": {"bbox": [0, -95, 1, 1]}}, "aoi.bbox: south latitude -95.0 is out of range"),
    ("unsafe id", {"id": "../etc"}, "id: '../etc' is not a safe id"),
    ("unknown source", {"source": "nowhere"}, "source: unknown source 'nowhere'"),
    ("cloud cover > 100", {"max_cloud_cover": 150}, "max_cloud_cover: 150 must be a number from 0 to 100"),
    ("valid fraction < 0", {"min_valid_fraction": -0.1}, "min_valid_fraction: -0.1 must be a number from 0 to 1"),
    ("no periods", {"periods": []}, "periods: must be a non-empty list"),
    ("reversed dates", {"periods": [{"id": "p", "start": "2021-05-01", "end": "2021-01-01"}]}, "periods[0]: start 2021-05-01 is after end 2021-01-01"),
    ("duplicate period", {"periods": [2020, 2020]}, "periods: duplicate period '2020'"),
    ("quarter 5", {"periods": ["2021Q5"]}, "periods[0]: '2021Q5' is not a period"),
    ("unknown field", {"colour": "red"}, "colour: unknown field"),
    ("unknown cloud mask", {"cloud_mask": "magic"}, "cloud_mask: unknown cloud mask 'magic'"),
    ("no aoi", {"aoi": None}, "aoi: missing"),
    ("point aoi", {"aoi": {"geometry": {"type": "Point", "coordinates": [0, 0]}}}, "aoi.geometry: must be a GeoJSON Polygon or MultiPolygon"),
    ("bad growth", {"source": "embedded", "embedded": {"growth_factor": -1}}, "embedded.growth_factor: -1 must be a float from 1 to 10"),
    ("unknown layer kind", {"context": {"volcanoes": "v.geojson"}}, "context.volcanoes: unknown layer kind"),
    ("bad detections mode", {"detections": {"file": "d.geojson", "mode": "sometimes"}}, "detections.mode: 'sometimes' must be one of presence, new"),
    ("bad cron", {"refresh": {"cron": "every monday"}}, "refresh.cron: 'every monday' is not a five-field cron"),
    ("s2cloudless on PC", {"source": "planetary-computer", "cloud_mask": "scl+s2cloudless"}, "cloud_mask: s2cloudless needs Sentinel-2 L1C scenes"),
]  # fmt: skip


@pytest.mark.parametrize("change, message", [c[1:] for c in REGIONS], ids=[c[0] for c in REGIONS])
def test_regions_file(change: dict[str, Any], message: str) -> None:
    raw = {k: v for k, v in {**BASE, **change}.items() if v is not None}
    with pytest.raises(RegionsError) as e:
        parse_regions({"regions": [raw]})
    text = "; ".join(e.value.problems)
    assert f"regions[0] ({raw['id']})." in text and message in text, text


# ---------------------------------------------------------------- context layers (13)


def _region() -> Any:
    return parse_regions({"regions": [BASE]}).regions[0]


def _write(d: Path, name: str, content: Any) -> Path:
    p = d / name
    if isinstance(content, str):
        p.write_text(content)
    else:
        geoms, crs, cols = content
        gpd.GeoDataFrame(cols or {"name": ["a"] * len(geoms)}, geometry=geoms, crs=crs).to_file(p)
    return p


UTM_AS_4326 = json.dumps({"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {"name": "a"}, "geometry": shapely.geometry.mapping(shapely.box(330000, 8560000, 331000, 8561000))}]})  # fmt: skip
CONTEXT: list[tuple[str, str, str, Any, str]] = [
    ("missing file", "protected_areas", "nope.geojson", None, "does not exist"),
    ("not a vector file", "protected_areas", "garbage.geojson", "this is not json", "cannot be read"),
    ("points as protected areas", "protected_areas", "pts.geojson", ([POINT], 4326, None), "feature 0 is a Point; this layer takes Polygon or MultiPolygon"),
    ("lines as concessions", "concessions", "lines.geojson", ([shapely.LineString([(-70.55, -13.0), (-70.54, -12.99)])], 4326, None), "feature 0 is a LineString"),
    ("no features", "protected_areas", "empty.geojson", '{"type":"FeatureCollection","features":[]}', "has no features"),
    ("projected metres in a GeoJSON", "protected_areas", "utm.geojson", UTM_AS_4326, "is not longitude/latitude as its CRS"),
    ("spreadsheet", "protected_areas", "a.xlsx", "x", "unsupported format '.xlsx'"),
    ("CSV without coordinates", "settlements", "s.csv", "name,pop\na,1\n", "no coordinate columns"),
    ("CSV with text coordinates", "settlements", "s2.csv", "name,lon,lat\na,west,south\n", "row 2: coordinates ('west', 'south') are not numbers"),
    ("grievance without a date", "grievances", "g.csv", "grievance_id,date,lon,lat,category\nG1,yesterday,-70.55,-13.0,water\n", "row 2: date 'yesterday' is not an ISO date"),
    ("empty geometry", "protected_areas", "emptyg.geojson", ([shapely.Polygon()], 4326, None), "feature 0 has an empty geometry"),
    ("no CRS", "protected_areas", "nocrs.gpkg", ([POLY], None, None), "has no CRS"),
    ("duplicate ids", "concessions", "dup.geojson", ([POLY, POLY], 4326, {"concession_id": ["C1", "C1"], "name": ["a", "b"]}), "id 'C1' is used by features 0 and 1"),
]  # fmt: skip


@pytest.mark.parametrize("kind, name, content, message", [c[1:] for c in CONTEXT], ids=[c[0] for c in CONTEXT])  # fmt: skip
def test_context_layer(tmp_path: Path, kind: str, name: str, content: Any, message: str) -> None:
    path = tmp_path / name if content is None else _write(tmp_path, name, content)
    with pytest.raises(ContextError) as e:
        read_context(_region(), kind, path)
    assert str(path) in str(e.value) and message in str(e.value), str(e.value)


# ---------------------------------------------------------------- mining labels (6)


def _scene() -> Any:
    from ml.features import Scene

    t = Affine(10, 0, 330_000, 0, -10, 8_562_000)
    return Scene(np.zeros((9, 8, 8), "float32"), np.ones((8, 8), bool), t, CRS.from_epsg(32719))


LABELS: list[tuple[str, str, Any, str]] = [
    ("missing file", "nope.geojson", None, "does not exist"),
    ("points without labels", "pts.geojson", ([POINT], 4326, {"period": ["2020"]}), "point labels need a `label` property"),
    ("bad period", "bad.geojson", ([POLY], 4326, {"period": ["20x0"]}), "feature 0: period '20x0' is not a period"),
    ("no CRS", "nocrs.gpkg", ([POLY], None, {"period": ["2020"]}), "has no CRS"),
    ("no features", "empty.geojson", '{"type":"FeatureCollection","features":[]}', "has no features"),
    ("wrong CRS", "utm.geojson", UTM_AS_4326, "is not longitude/latitude"),
]  # fmt: skip


@pytest.mark.parametrize("name, content, message", [c[1:] for c in LABELS], ids=[c[0] for c in LABELS])  # fmt: skip
def test_mining_labels(tmp_path: Path, name: str, content: Any, message: str) -> None:
    from ml.features import LabelsError, rasterize_labels

    path = tmp_path / name if content is None else _write(tmp_path, name, content)
    with pytest.raises(LabelsError) as e:
        rasterize_labels(path, _scene(), "2021")
    assert str(path) in str(e.value) and message in str(e.value), str(e.value)


# ---------------------------------------------------------------- imported detections (8)

DETECTIONS: list[tuple[str, str, Any, dict[str, Any], str]] = [
    ("missing file", "nope.geojson", None, {}, "does not exist"),
    ("lines", "lines.geojson", ([shapely.LineString([(-70.55, -13.0), (-70.54, -12.99)])], 4326, {"period": ["2020"]}), {}, "LineString"),
    ("no period column", "noperiod.geojson", ([POLY], 4326, {"name": ["a"]}), {}, "period"),
    ("bad period", "badp.geojson", ([POLY], 4326, {"period": ["20x0"]}), {}, "20x0"),
    ("negative mapped area", "neg.geojson", ([POLY], 4326, {"period": ["2020"], "ha": [-3.0]}), {"mapped_area_field": "ha"}, "ha"),
    ("text mapped area", "txt.geojson", ([POLY], 4326, {"period": ["2020"], "ha": ["big"]}), {"mapped_area_field": "ha"}, "ha"),
    ("no features", "empty.geojson", '{"type":"FeatureCollection","features":[]}', {}, "has no features"),
    ("unsupported format", "d.kml", "<kml/>", {}, "unsupported format '.kml'"),
]  # fmt: skip


@pytest.mark.parametrize("name, content, fields, message", [c[1:] for c in DETECTIONS], ids=[c[0] for c in DETECTIONS])  # fmt: skip
def test_imported_detections(tmp_path: Path, name: str, content: Any, fields: dict[str, Any], message: str) -> None:  # fmt: skip
    path = tmp_path / name if content is None else _write(tmp_path, name, content)
    with pytest.raises(DetectionsError) as e:
        read_detections(DetectionsSpec(path=str(path), **fields))
    assert str(path) in str(e.value) and message in str(e.value), str(e.value)


# ---------------------------------------------------------------- STAC items (9)


def _item() -> dict[str, Any]:
    """A real Earth Search item's shape (the embedded world's, which CI has)."""
    from tests.conftest import small_region

    region = small_region()
    return {
        "type": "Feature", "stac_version": "1.0.0", "id": "S2A_19LCF_20210620_0_L2A",
        "collection": "sentinel-2-l2a", "bbox": list(region.bbox),
        "geometry": region.geometry,
        "properties": {"datetime": "2021-06-20T14:56:21Z", "s2:mgrs_tile": "19LCF",
                       "s2:processing_baseline": "03.00", "eo:cloud_cover": 12.0, "proj:epsg": 32719},
        "assets": {r: {"href": f"file:///x/{r}.tif", "type": "image/tiff; application=geotiff; profile=cloud-optimized", "roles": ["data"]}
                   for r in ("blue", "green", "red", "nir", "swir16", "swir22", "scl")},
        "links": [],
    }  # fmt: skip


def _drop_tile(i: dict[str, Any]) -> None:
    i["properties"].pop("s2:mgrs_tile")
    i["id"] = "scene-without-tile"


STAC: list[tuple[str, Callable[[dict[str, Any]], Any], str]] = [
    ("no id", lambda i: i.pop("id"), "item without an id"),
    ("no datetime", lambda i: i["properties"].pop("datetime"), "S2A_19LCF_20210620_0_L2A: no datetime"),
    ("bad datetime", lambda i: i["properties"].__setitem__("datetime", "yesterday"), "bad datetime 'yesterday'"),
    ("no geometry", lambda i: i.pop("geometry"), "S2A_19LCF_20210620_0_L2A: no geometry"),
    ("empty geometry", lambda i: i.__setitem__("geometry", {"type": "Polygon", "coordinates": []}), "empty geometry"),
    ("missing SCL asset", lambda i: i["assets"].pop("scl"), "missing assets for scl"),
    ("missing red asset", lambda i: i["assets"].pop("red"), "missing assets for red"),
    ("wrong CRS", lambda i: i["properties"].__setitem__("proj:epsg", 4326), "proj:epsg 4326 does not match MGRS tile 19LCF (UTM zone 19S, EPSG:32719)"),
    ("no MGRS tile", _drop_tile, "scene-without-tile: no MGRS tile in properties or id"),
]  # fmt: skip


@pytest.mark.parametrize("mutate, message", [c[1:] for c in STAC], ids=[c[0] for c in STAC])
def test_stac_item(mutate: Callable[[dict[str, Any]], Any], message: str) -> None:
    item = copy.deepcopy(_item())
    assert normalize_item(copy.deepcopy(item)).epsg == 32719  # the unbroken item is fine
    mutate(item)
    with pytest.raises(NormalizeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        normalize_item(item)


def test_an_item_without_projection_takes_its_tiles_zone() -> None:
    item = _item()
    item["properties"].pop("proj:epsg")
    assert normalize_item(item).epsg == 32719


def test_the_suite_has_at_least_40_cases() -> None:
    assert len(REGIONS) + len(CONTEXT) + len(LABELS) + len(DETECTIONS) + len(STAC) >= 40


# ---------------------------------------------------------------- nothing written is lost


def test_a_bad_layer_leaves_the_written_context_tables(tmp_path: Path) -> None:
    """context_layers with one broken file fails naming it; the tables of the previous
    good run stay byte for byte (the asset reads every layer before writing any)."""

    import yaml

    from assets.context import context_layers
    from assets.resources import AsmwatchSettings
    from tests.conftest import materialize

    good = _write(tmp_path, "pa.geojson", ([POLY], 4326, {"name": ["Reserva"]}))
    conc = _write(tmp_path, "c.geojson", ([POLY], 4326, {"concession_id": ["C1"], "name": ["Mina"]}))  # fmt: skip
    regions = tmp_path / "regions.yaml"
    layers = {"protected_areas": str(good), "concessions": str(conc)}
    doc = {"regions": [{**BASE, "id": "demo-huepetuhe", "context": layers}]}  # a known partition
    regions.write_text(yaml.safe_dump(doc))
    res = {"settings": AsmwatchSettings(data_root=str(tmp_path / "data"), regions_file=str(regions))}  # fmt: skip
    key = "demo-huepetuhe"
    assert materialize([context_layers], partition_key=key, resources=res).success
    tables = sorted((tmp_path / "data" / "context" / key).glob("*.parquet"))
    before = {p.name: p.read_bytes() for p in tables}
    assert set(before) == {"protected_areas.parquet", "concessions.parquet"}

    conc.write_text("this is not json")  # the concessions file gets damaged
    failed = materialize([context_layers], partition_key=key, resources=res, raise_on_error=False)  # fmt: skip
    assert not failed.success
    error = str(failed.get_step_failure_events()[0].event_specific_data.error)  # type: ignore[union-attr]
    assert f"concessions layer {conc}: cannot be read" in error
    assert {p.name: p.read_bytes() for p in tables} == before
    retried = [e for e in failed.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
    assert not retried  # bad input is not retried
