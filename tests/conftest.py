"""Shared fixtures: the real material in ../shared/data, and a small embedded world."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipelines.regions import EmbeddedSpec, Period, Region, load_regions

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"


def shared(rel: str) -> Path:
    """A file of ../shared/data; the test is skipped with a reason when it is absent."""
    p = SHARED / rel
    if not p.exists():
        pytest.skip(f"real fixture {p} is absent (../shared/data is not part of a user's clone)")
    return p


def load_json(rel: str) -> Any:
    return json.loads(shared(rel).read_text())


def small_region(seed: int = 7, periods: tuple[str, ...] = ("2019", "2020", "2021")) -> Region:
    """A small embedded region (about 2.7 km square) for fast simulator tests."""
    return Region(
        id="test-small",
        name="test region",
        bbox=(-70.55, -13.00, -70.525, -12.975),
        geometry={
            "type": "Polygon",
            "coordinates": [
                [
                    [-70.55, -13.0],
                    [-70.525, -13.0],
                    [-70.525, -12.975],
                    [-70.55, -12.975],
                    [-70.55, -13.0],
                ]
            ],
        },
        periods=tuple(Period(p, dt.date(int(p), 1, 1), dt.date(int(p), 12, 31)) for p in periods),
        source="embedded",
        collection="sentinel-2-l2a",
        max_cloud_cover=60.0,
        embedded=EmbeddedSpec(seed=seed, scenes_per_period=3, growth_factor=1.5),
    )


@pytest.fixture(scope="session")
def demo_region() -> Region:
    return load_regions(ROOT / "regions.yaml").get("demo-huepetuhe")


@pytest.fixture(scope="session")
def small_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pipelines.simulator import simulate_world

    out = tmp_path_factory.mktemp("world") / "test-small"
    simulate_world(small_region(), out)
    return out


@pytest.fixture(scope="session")
def small_server(small_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real stac-fastapi server on 127.0.0.1 over the small world."""
    from pipelines.simulator import load_items
    from pipelines.stac.geoparquet import write_geoparquet
    from pipelines.stac.server import EmbeddedStacServer

    d = tmp_path_factory.mktemp("serve")
    gp = write_geoparquet(load_items(small_world), d / "items.parquet")
    with EmbeddedStacServer(gp, d) as server:
        yield server.url
