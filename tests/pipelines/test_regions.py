"""Regions file validation: every bad case gets its own error naming field and problem."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from pipelines.regions import RegionsError, load_regions, parse_regions

ROOT = Path(__file__).resolve().parents[2]

GOOD: dict[str, Any] = {
    "regions": [
        {
            "id": "mdd",
            "name": "Madre de Dios",
            "aoi": {"bbox": [-70.9, -13.3, -69.3, -12.4]},
            "periods": [2020, 2021],
            "source": "earth-search",
            "max_cloud_cover": 40,
        }
    ]
}


def problems_for(mutate: Any) -> list[str]:
    doc = copy.deepcopy(GOOD)
    mutate(doc["regions"][0])
    with pytest.raises(RegionsError) as e:
        parse_regions(doc)
    return e.value.problems


def test_shipped_regions_file_is_valid() -> None:
    config = load_regions(ROOT / "regions.yaml")
    assert {"demo-huepetuhe", "madre-de-dios", "brokopondo", "cuyuni-mazaruni", "kwale",
            "west-africa-gold-belt"} <= set(config.ids)  # fmt: skip
    demo = config.get("demo-huepetuhe")
    assert demo.source == "embedded" and demo.embedded is not None
    assert [p.id for p in demo.periods] == ["2019", "2020", "2021"]
    # Presets sit at their real coordinates.
    mdd = config.get("madre-de-dios")
    assert -71 < mdd.bbox[0] < mdd.bbox[2] < -69 and -14 < mdd.bbox[1] < mdd.bbox[3] < -12
    kwale = config.get("kwale")
    assert 38.5 < kwale.bbox[0] < 40 and -5 < kwale.bbox[1] < -3.5


def test_good_document_parses_with_periods_and_stac_url() -> None:
    config = parse_regions(copy.deepcopy(GOOD))
    r = config.get("mdd")
    assert r.stac_url == "https://earth-search.aws.element84.com/v1"
    assert r.period("2021").datetime_range == "2021-01-01T00:00:00Z/2021-12-31T23:59:59Z"
    assert r.previous_period("2021") is not None and r.previous_period("2020") is None


def test_quarters_and_explicit_ranges() -> None:
    def m(r: dict[str, Any]) -> None:
        r["periods"] = [
            "2021Q1",
            "2021Q4",
            {"id": "dry-2022", "start": "2022-06-01", "end": "2022-09-30"},
        ]

    doc = copy.deepcopy(GOOD)
    m(doc["regions"][0])
    r = parse_regions(doc).get("mdd")
    q1, q4, dry = r.periods
    assert (q1.start.isoformat(), q1.end.isoformat()) == ("2021-01-01", "2021-03-31")
    assert q4.end.isoformat() == "2021-12-31"
    assert dry.id == "dry-2022" and dry.end.month == 9


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda r: r["aoi"].update(bbox=[1, 2, 3]), "aoi.bbox: must be a list of 4 numbers"),
        (lambda r: r["aoi"].update(bbox=["a", 2, 3, 4]), "aoi.bbox: all 4 values must be numbers"),
        (
            lambda r: r["aoi"].update(bbox=[-70, -12, -71, -11]),
            "west (-70.0) must be less than east",
        ),
        (
            lambda r: r["aoi"].update(bbox=[-70, -12, -69, -12]),
            "south (-12.0) must be less than north",
        ),
        (
            lambda r: r["aoi"].update(bbox=[-200, -12, -69, -11]),
            "west longitude -200.0 is out of range",
        ),
        (
            lambda r: r["aoi"].update(bbox=[-70, -95, -69, -11]),
            "south latitude -95.0 is out of range",
        ),
        (lambda r: r.update(aoi={}), "aoi: missing"),
        (
            lambda r: r.update(
                aoi={
                    "geometry": {
                        "type": "Polygon",
                        "coordinates": [[[0, 0], [1, 1], [1, 0], [0, 1], [0, 0]]],
                    }
                }
            ),
            "invalid geometry: Self-intersection",
        ),
        (
            lambda r: r.update(
                aoi={
                    "geometry": {
                        "type": "Polygon",
                        "coordinates": [[[0, 0], [1, 1], [2, 2], [0, 0]]],
                    }
                }
            ),
            "the geometry is empty",
        ),
        (
            lambda r: r.update(aoi={"geometry": {"type": "Polygon", "coordinates": "x"}}),
            "malformed coordinates",
        ),
        (
            lambda r: r.update(aoi={"geometry": {"type": "Point", "coordinates": [0, 0]}}),
            "must be a GeoJSON Polygon",
        ),
        (
            lambda r: r.update(
                aoi={
                    "geometry": {
                        "type": "Polygon",
                        "coordinates": [[[0, 0], [0, 95], [1, 95], [0, 0]]],
                    }
                }
            ),
            "coordinates out of range",
        ),
        (
            lambda r: r.update(periods=[{"id": "p", "start": "2021-09-01", "end": "2021-06-01"}]),
            "is after end",
        ),
        (
            lambda r: r.update(periods=[{"id": "p", "start": "2021-13-01", "end": "2021-12-01"}]),
            "is not an ISO date",
        ),
        (lambda r: r.update(periods=["2021Q5"]), "'2021Q5' is not a period"),
        (lambda r: r.update(periods=[2021, 2020]), "periods must be listed in time order"),
        (lambda r: r.update(periods=[2021, 2021]), "duplicate period '2021'"),
        (lambda r: r.update(periods=[1999]), "outside Sentinel-2's era"),
        (lambda r: r.update(periods=[]), "periods: must be a non-empty list"),
        (lambda r: r.update(source="sentinel-hub"), "source: unknown source 'sentinel-hub'"),
        (
            lambda r: r.update(max_cloud_cover=150),
            "max_cloud_cover: 150 must be a number from 0 to 100",
        ),
        (lambda r: r.update(id="../../etc"), "is not a safe id"),
        (lambda r: r.update(id="mdd'; DROP TABLE scenes; --"), "is not a safe id"),
        (lambda r: r.update(id="Madre de Dios"), "is not a safe id"),
        (lambda r: r.update(context={"lakes": "x.geojson"}), "context.lakes: unknown layer kind"),
        (
            lambda r: r.update(context={"concessions": "embedded:../../x"}),
            "must stay inside the embedded world",
        ),
        (lambda r: r.update(colour="red"), ".colour: unknown field"),
    ],
)
def test_each_bad_case_names_field_and_problem(mutate: Any, expected: str) -> None:
    problems = problems_for(mutate)
    assert any(expected in p for p in problems), problems
    assert all(p.startswith("regions[0]") for p in problems), problems


def test_duplicate_ids() -> None:
    doc = copy.deepcopy(GOOD)
    doc["regions"].append(copy.deepcopy(doc["regions"][0]))
    with pytest.raises(RegionsError) as e:
        parse_regions(doc)
    assert e.value.problems == ["regions[1] (mdd).id: duplicate id 'mdd' (also regions[0])"]


def test_every_problem_is_reported_at_once() -> None:
    doc = copy.deepcopy(GOOD)
    doc["regions"][0].update(source="nowhere", max_cloud_cover=-1, periods=["20x0"])
    with pytest.raises(RegionsError) as e:
        parse_regions(doc)
    text = str(e.value)
    assert "3 problem(s)" in text
    for fragment in ("source", "max_cloud_cover", "periods[0]"):
        assert fragment in text


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(RegionsError, match="file not found"):
        load_regions(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("regions: [unclosed\n")
    with pytest.raises(RegionsError, match="not valid YAML"):
        load_regions(bad)
    empty = tmp_path / "empty.yaml"
    empty.write_text("regions: []\n")
    with pytest.raises(RegionsError, match="non-empty list"):
        load_regions(empty)


@pytest.mark.parametrize(
    "cron, ok",
    [
        ("0 6 * * 1", True), ("*/15 0-6 * * mon-fri", True), ("0 0 1 jan,jul *", True),
        ("0 12 1-15/2 * *", True), ("0 0 * * 7", True),
        ("every monday", False), ("0 6 * *", False), ("60 * * * *", False), ("* 24 * * *", False),
        ("* * 0 * *", False), ("* * * 13 *", False), ("* * * * 8", False), ("*/0 * * * *", False),
        ("5-1 * * * *", False), ("0 6 * * mondy", False),
    ],
)  # fmt: skip
def test_cron_expressions_are_checked_as_dagster_takes_them(cron: str, ok: bool) -> None:
    """The regions file's cron is checked without Dagster's private parser; what it
    accepts, a Dagster schedule accepts too."""
    import dagster as dg

    from pipelines.regions import _valid_cron

    assert _valid_cron(cron) is ok
    if ok:
        dg.ScheduleDefinition(name="x", cron_schedule=cron, target=dg.AssetSelection.all())


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (
            lambda r: r.update(refresh="weekly"),
            "refresh: must be a mapping (cron, timezone, watch_scenes, period), got str",
        ),
        (lambda r: r.update(aoi="peru"), "aoi: must be a mapping: give 'bbox"),
        (lambda r: r.pop("periods"), "periods: missing; a list of years"),
        (lambda r: r.pop("id"), "id: missing; a safe id"),
        (lambda r: r.update(name=3), "name: 3 must be text"),
        (
            lambda r: r.update(max_cloud_cover=True),
            "max_cloud_cover: True must be a number from 0 to 100",
        ),
        (lambda r: r.update(max_cloud_cover="lots"), "max_cloud_cover: 'lots' must be a number"),
        (
            lambda r: r.update(source="embedded", embedded={"scenes_per_period": 2.5}),
            "embedded.scenes_per_period: 2.5 must be a whole number from 1 to 24",
        ),
        (
            lambda r: r.update(source="embedded", embedded={"seed": -1}),
            "embedded.seed: -1 must be a whole number from 0 to 4294967295",
        ),
        (
            lambda r: r.update(source="embedded", embedded={"wind": 3}),
            "embedded.wind: unknown field (known: growth_factor, reprocessed_twins, scenes_per_period, seed)",
        ),
        (
            lambda r: r.update(refresh={"period": "latest"}),
            "refresh.period: 'latest': use one of current, all",
        ),
        (lambda r: r.update(detections={"file": " "}), "detections.file: must be a file path"),
        (
            lambda r: r.update(detections={"file": "d.gpkg", "period": "20x1"}),
            "detections.period: '20x1' is not a period",
        ),
        (
            lambda r: r.update(
                periods=[2020, {"id": "x y", "start": "2020-01-01", "end": "2020-02-01"}]
            ),
            "periods[1].id: 'x y' must be",
        ),
        (
            lambda r: r.update(collection="s2 l2a"),
            "collection: 's2 l2a' is not a valid collection id",
        ),
    ],
)
def test_schema_errors_are_worded_with_their_path(mutate: Any, expected: str) -> None:
    """The pydantic schema's own errors (types, missing fields, ranges, Literal sets,
    nested blocks) come out in the same words and with the same paths as the rest."""
    problems = problems_for(mutate)
    assert any(expected in p for p in problems), problems
    assert all(p.startswith("regions[0]") for p in problems), problems
    assert not any("Input should" in p or "Value error" in p for p in problems), problems


def test_the_schema_is_pydantic_with_closed_sets_as_literals() -> None:
    from typing import get_args

    from pipelines.regions import (
        CLOUD_MASKS,
        EmbeddedSpec,
        RefreshSpec,
        RegionEntry,
        SeriesSpec,
    )

    assert get_args(RegionEntry.model_fields["cloud_mask"].annotation) == CLOUD_MASKS
    assert get_args(RefreshSpec.model_fields["period"].annotation) == ("current", "all")
    assert get_args(SeriesSpec.model_fields["every"].annotation) == ("year", "quarter")
    # Blocks are immutable, and strict: YAML's "yes" is not a boolean.
    spec = EmbeddedSpec(seed=3)
    with pytest.raises(Exception, match="frozen"):
        spec.seed = 4  # type: ignore[misc]
    r = parse_regions({"regions": [{**GOOD["regions"][0], "refresh": {"cron": "0 6 * * 1"}}]})
    assert r.regions[0].refresh == RefreshSpec(cron="0 6 * * 1")
