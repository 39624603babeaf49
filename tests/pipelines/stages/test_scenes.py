"""The scenes table is stac-geoparquet whose items are valid STAC: pystac reads them, and
they pass the STAC item schema (checked offline, with pystac's own copy of the core
schema; the extension schemas would be downloads, so they are not checked here)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pystac
import pytest
from pystac.validation.stac_validator import JsonSchemaSTACValidator

from pipelines.infra.layout import scenes_path
from pipelines.stages.scenes import with_collection_link
from pipelines.stages.stac.normalize import normalize_items
from tests.conftest import load_json, small_region


def _core_problem(item: dict[str, Any]) -> str | None:
    """What the STAC item core schema says is wrong with ``item`` (None: valid)."""
    item = json.loads(json.dumps(item))  # as JSON has it (rustac gives tuples for arrays)
    migrated = pystac.Item.from_dict(item, migrate=True).to_dict(
        include_self_link=False, transform_hrefs=False
    )
    validator = JsonSchemaSTACValidator()
    try:
        validator.validate_core(migrated, pystac.STACObjectType.ITEM, migrated["stac_version"])
    except pystac.STACValidationError as e:
        return str(e)
    return None


@pytest.fixture(autouse=True)
def _no_schema_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every schema must come from pystac's local copies: a download fails the test."""

    def refuse(self: Any, source: Any, *args: Any, **kwargs: Any) -> str:
        raise AssertionError(f"schema download attempted: {source}")

    monkeypatch.setattr(pystac.stac_io.DefaultStacIO, "read_text", refuse)


def _read(path: Path) -> list[dict[str, Any]]:
    import rustac

    async def read() -> dict[str, Any]:
        return await rustac.read(str(path))

    return list(asyncio.run(read())["features"])


def test_the_scenes_table_holds_valid_stac_items(small_scenes_root: Path) -> None:
    region = small_region()
    items = _read(scenes_path(small_scenes_root, region.id, region.periods[0].id))
    assert items
    for item in items:
        assert _core_problem(item) is None, item["id"]
        rels = {link["rel"]: link["href"] for link in item["links"]}
        assert rels["collection"].startswith("http://127.0.0.1:")  # where it came from
        assert rels["collection"].endswith(f"/collections/{item['collection']}")


def test_real_earth_search_items_keep_their_links_and_validate() -> None:
    page = load_json("stac/earth-search-v1/search-post_bbox-9-47-10-48_2020-03-01-to-05_s2l2a.page1.json")  # fmt: skip
    scenes = normalize_items(page["features"]).scenes
    assert scenes
    for scene in scenes:
        item = scene.to_item()
        rels = [link["rel"] for link in item["links"]]
        assert {"self", "collection", "root"} <= set(rels) and "thumbnail" not in rels
        assert all(link["href"].startswith("https://earth-search.aws.element84.com/v1") for link in item["links"] if link["rel"] in ("self", "collection", "root"))  # fmt: skip
        assert _core_problem(item) is None, item["id"]


def test_an_item_without_links_gets_its_collection_link_or_fails_the_schema() -> None:
    """A provider that leaves links out (Earth Search with ``fields`` exclusions): the
    STAC item schema then requires a collection link, which the scenes stage adds."""
    page = load_json("stac/earth-search-v1/search-post_bbox-9-47-10-48_2020-03-01-to-05_s2l2a.page1.json")  # fmt: skip
    bare = [{**f, "links": []} for f in page["features"]]
    item = normalize_items(bare).scenes[0].to_item()
    problem = _core_problem(item)
    assert problem is not None and "collection" in problem  # the check can fail
    fixed = with_collection_link(item, "https://earth-search.aws.element84.com/v1/")
    assert fixed["links"] == [{"rel": "collection", "href": f"https://earth-search.aws.element84.com/v1/collections/{item['collection']}", "type": "application/json"}]  # fmt: skip
    assert _core_problem(fixed) is None
    assert with_collection_link(fixed, "https://elsewhere") == fixed  # one is enough
