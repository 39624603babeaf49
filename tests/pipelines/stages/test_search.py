"""Searching STAC APIs: the real embedded server on 127.0.0.1, and Earth Search replayed."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pystac_client
import pytest

from pipelines.regions import Period
from pipelines.stages.stac.search import search_scenes
from tests.conftest import shared, small_region


def test_server_answers_bbox_datetime_filter_and_pages(small_server: str) -> None:
    client = pystac_client.Client.open(small_server)
    coll = "sentinel-2-l2a"
    all_items = list(client.search(collections=[coll], max_items=None).items())
    assert len(all_items) == 12
    # bbox: inside the world, and far away.
    inside = client.search(collections=[coll], bbox=[-70.54, -12.99, -70.53, -12.98])
    assert len(list(inside.items())) == 12
    away = client.search(collections=[coll], bbox=[10, 10, 11, 11])
    assert len(list(away.items())) == 0
    # datetime: one year.
    y2020 = list(client.search(collections=[coll], datetime="2020-01-01/2020-12-31").items())
    assert len(y2020) == 4 and all(i.datetime and i.datetime.year == 2020 for i in y2020)
    # CQL2 filter on cloud cover.
    clear = list(
        client.search(
            collections=[coll],
            filter={"op": "<=", "args": [{"property": "eo:cloud_cover"}, 20]},
            filter_lang="cql2-json",
        ).items()
    )
    expected = [i for i in all_items if i.properties["eo:cloud_cover"] <= 20]
    assert 0 < len(clear) == len(expected) < 12
    assert {i.id for i in clear} == {i.id for i in expected}
    # Paging: 5 items per page still returns everything, in several pages.
    pages = list(client.search(collections=[coll], limit=5).pages_as_dicts())
    assert [len(p["features"]) for p in pages] == [5, 5, 2]


def test_search_scenes_on_embedded_server(small_server: str) -> None:
    region = small_region()
    for period in region.periods:
        res = search_scenes(small_server, region, period)
        assert res.server_filter
        assert all(s.cloud_cover is not None and s.cloud_cover <= 60 for s in res.scenes)
        assert all(s.datetime.year == int(period.id) for s in res.scenes)
        assert any("duplicate" in r for _, r in res.dropped)
        assert res.scenes and all(s.assets["red"].href.startswith("file://") for s in res.scenes)


def test_search_scenes_client_side_filter(small_server: str) -> None:
    import dataclasses

    region = dataclasses.replace(small_region(), max_cloud_cover=10.0)
    period = region.periods[0]
    server = search_scenes(small_server, region, period, accepts_filter=True)
    # The embedded server declares filter conformance, so force the client-side path
    # by dropping the conformance class pystac-client checks.
    import pystac_client.client as pc

    orig = pc.Client.conforms_to

    def no_filter(self: pc.Client, *classes: object) -> bool:
        if any(getattr(c, "name", "") == "FILTER" for c in classes):
            return False
        return orig(self, *classes)  # type: ignore[arg-type]

    pc.Client.conforms_to = no_filter  # type: ignore[method-assign]
    try:
        client_side = search_scenes(small_server, region, period, accepts_filter=False)
    finally:
        pc.Client.conforms_to = orig  # type: ignore[method-assign]
    assert not client_side.server_filter
    assert [s.id for s in client_side.scenes] == [s.id for s in server.scenes]
    assert client_side.too_cloudy >= 1 and client_side.returned > server.returned


def test_earth_search_recorded_session_yields_8_scenes() -> None:
    """The real pystac-client code path against a recorded Earth Search v1 session."""
    vcr = pytest.importorskip("vcr")
    cassette = shared(
        "stac/cassettes/xcube-stac_test_search_data_searchable_catalog_earth-search-v1.yaml"
    )
    import dataclasses

    region = dataclasses.replace(
        small_region(),
        source="earth-search",
        bbox=(9.0, 47.0, 10.0, 48.0),
        geometry={
            "type": "Polygon",
            "coordinates": [[[9, 47], [10, 47], [10, 48], [9, 48], [9, 47]]],
        },
        max_cloud_cover=100.0,
    )
    period = Period("2020-03", dt.date(2020, 3, 1), dt.date(2020, 3, 5))
    my_vcr = vcr.VCR(record_mode="none", match_on=["method", "uri"])
    with my_vcr.use_cassette(str(cassette)):
        res = search_scenes("https://earth-search.aws.element84.com/v1", region, period)
    assert res.returned == 16
    assert len(res.scenes) == 8
    assert all(s.processing_baseline == "05.00" for s in res.scenes)


def test_unreachable_api_gives_a_clear_error(tmp_path: Path) -> None:
    from pipelines.stages.stac.search import StacSearchError

    region = small_region()
    with pytest.raises(StacSearchError, match=r"cannot open STAC API http://127.0.0.1:9/"):
        search_scenes("http://127.0.0.1:9/", region, region.periods[0])
