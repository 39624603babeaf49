"""Shared fixtures: the real material in ../shared/data, and a small embedded world."""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipelines.regions import EmbeddedSpec, Period, Region, load_regions

# Unreachable STAC APIs are part of several tests: retry them quickly (the retry
# behaviour itself is tested in tests/pipelines/stages/test_faults.py with its own settings).
os.environ.setdefault("ASMWATCH_STAC_BACKOFF_S", "0.05")

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"


def shared(rel: str) -> Path:
    """A file of ../shared/data; the test is skipped with a reason when it is absent."""
    p = SHARED / rel
    if not p.exists():
        pytest.skip(f"real fixture {p} is absent (../shared/data is not part of a user's clone)")
    return p


#: Where Earth Search serves the real 29RKH scene whose decimated files are in ../shared.
ES_COGS = "https://sentinel-cogs.s3.us-west-2.amazonaws.com"
REAL_TILE = "raster/earthsearch_S2A_29RKH_20200219_0_L2A_decimated"


def real_tile_items(
    resolution: float, base_url: str | None = None
) -> tuple[list[dict[str, Any]], Any]:
    """The real 29RKH item pointed at the decimated files as they are (100 m / 200 m).

    ``base_url``: serve them from there (a local HTTP server standing in for Earth
    Search's bucket, same paths) instead of ``file://`` hrefs.
    """
    import rasterio
    from affine import Affine
    from odc.geo.geobox import GeoBox

    from pipelines.stages.stac.normalize import normalize_item

    d = shared(REAL_TILE)
    raw = json.loads((d / "S2A_29RKH_20200219_0_L2A.json").read_text())
    # The item describes the full 10 m grid (10980 px); the files are decimated.
    assert raw["assets"]["red"]["proj:shape"] == [10980, 10980]
    for asset in raw["assets"].values():
        name = Path(asset["href"]).name
        if (d / name).exists() and not asset["href"].startswith("s3://"):
            with rasterio.open(d / name) as src:
                asset["href"] = (
                    asset["href"].replace(ES_COGS, base_url)
                    if base_url
                    else (d / name).resolve().as_uri()
                )
                asset["proj:shape"] = [src.height, src.width]
                asset["proj:transform"] = list(src.transform)[:6]
    item = normalize_item(raw).to_item()
    # A window over the cloudy north-east corner of the tile.
    geobox = GeoBox(
        (round(40_000 / resolution), round(49_800 / resolution)),
        Affine(resolution, 0, 259_980, 0, -resolution, 2_800_020),
        "EPSG:32629",
    )
    return [item], geobox


def mdd_department() -> dict[str, Any]:
    """The Madre de Dios department outline (GeoJSON geometry), a real region AOI."""
    doc = json.loads(shared("reference/boundaries/madre_de_dios_department.geojson").read_text())
    geometry: dict[str, Any] = doc["features"][0]["geometry"]
    return geometry


def mdd_context() -> dict[str, Any]:
    """The real SERNANP protected areas and native community lands, columns mapped."""
    return {
        "protected_areas": {
            "file": str(shared("context/pe_mdd_anp_sernanp.geojson")),
            "id": "codigo",
            "name": "nombre",
            "category": "categoria",
        },
        "indigenous_lands": {
            "file": str(shared("context/pe_mdd_native_communities_amw.geojson")),
            "id": "id",
            "name": "name_field",
        },
    }


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
    from pipelines.embedded.simulator import simulate_world

    out = tmp_path_factory.mktemp("world") / "test-small"
    simulate_world(small_region(), out)
    return out


@pytest.fixture(scope="session")
def small_server(small_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real stac-fastapi server on 127.0.0.1 over the small world."""
    from pipelines.embedded.server import EmbeddedStacServer
    from pipelines.embedded.simulator import load_items
    from pipelines.stages.stac.geoparquet import write_geoparquet

    d = tmp_path_factory.mktemp("serve")
    gp = write_geoparquet(load_items(small_world), d / "items.parquet")
    with EmbeddedStacServer(gp, d) as server:
        yield server.url


@pytest.fixture(scope="session")
def small_scenes_root(small_server: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data root holding the scenes stage's output for every period of the small world."""
    from pipelines.stages.scenes import find_scenes

    root = tmp_path_factory.mktemp("root")
    region = small_region()
    for period in region.periods:
        find_scenes(small_server, region, period, root, progress=lambda _m: None)
    return root


def write_band(path: Path, data: Any, epsg: int, transform: Any, nodata: int = 0) -> Path:
    """A small tiled, deflated GeoTIFF (one band) for hand-made scenes."""
    import rasterio

    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(
        path, "w", driver="GTiff", width=data.shape[1], height=data.shape[0], count=1,
        dtype=str(data.dtype), crs=f"EPSG:{epsg}", transform=transform, nodata=nodata,
        tiled=True, blockxsize=128, blockysize=128, compress="deflate",
    ) as dst:  # fmt: skip
        dst.write(data, 1)
    return path


def constant_scene(
    directory: Path,
    scene_id: str,
    when: str,
    epsg: int,
    bounds: tuple[float, float, float, float],
    dn: int,
    scl: int = 4,
    offset: float = 0.0,
) -> dict[str, Any]:
    """A canonical scene item whose reflectance bands all hold ``dn`` over ``bounds``.

    10 m bands at 10 m, B11/B12/SCL at 20 m, as in real L2A; hrefs are file:// URLs.
    """
    import numpy as np
    import shapely
    import shapely.geometry
    from affine import Affine
    from pyproj import Transformer

    from pipelines.stages.stac.normalize import ROLE_BANDS, ROLE_RESOLUTION

    x0, y0, x1, y1 = bounds
    assets: dict[str, Any] = {}
    for role, band in ROLE_BANDS.items():
        res = ROLE_RESOLUTION[role]
        shape = (round((y1 - y0) / res), round((x1 - x0) / res))
        transform = Affine(res, 0, x0, 0, -res, y1)
        value, dtype = (scl, np.uint8) if role == "scl" else (dn, np.uint16)
        path = write_band(
            directory / scene_id / f"{band}.tif", np.full(shape, value, dtype), epsg, transform
        )
        assets[role] = {
            "href": path.resolve().as_uri(),
            "type": "image/tiff; application=geotiff",
            "roles": ["data"],
            "raster:bands": [
                {"nodata": 0, "data_type": str(np.dtype(dtype)), "spatial_resolution": res}
                | ({} if role == "scl" else {"scale": 1e-4, "offset": offset})
            ],
            "proj:shape": list(shape),
            "proj:transform": list(transform)[:6],
        }
    to_ll = Transformer.from_crs(epsg, 4326, always_xy=True).transform
    footprint = shapely.transform(shapely.geometry.box(x0, y0, x1, y1), to_ll, interleaved=False)
    return {
        "type": "Feature",
        "stac_version": "1.0.0",
        "stac_extensions": [],
        "id": scene_id,
        "collection": "sentinel-2-l2a",
        "geometry": shapely.geometry.mapping(footprint),
        "bbox": list(footprint.bounds),
        "properties": {"datetime": when, "proj:epsg": epsg, "eo:cloud_cover": 0.0},
        "links": [],
        "assets": assets,
    }


@pytest.fixture(scope="session")
def small_composites_root(small_scenes_root: Path, small_world: Path) -> Path:
    """The small world's scenes and composites for every period, with its truth masks
    where the detection stage looks for them (embedded/<region>/truth)."""
    import shutil

    from pipelines.stages.composite import composite_for_region

    region = small_region()
    for period in region.periods:
        composite_for_region(region, period, small_scenes_root, chunk=256, progress=lambda _m: None)
    truth = small_scenes_root / "embedded" / region.id / "truth"
    if not truth.exists():
        shutil.copytree(small_world / "truth", truth)
    return small_scenes_root


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """`asmwatch demo` once for the session (2 training epochs): (data root, stdout).

    Tests of the CLI, the reports, the web map in Chromium and the table contracts read
    this one run's outputs instead of materialising the pipeline again.
    """
    import contextlib
    import io

    from assets.cli import main

    root = tmp_path_factory.mktemp("demo-run") / "data"
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        mp.setenv("ASMWATCH_DATA", str(root))
        mp.setenv("ASMWATCH_REGIONS", str(ROOT / "regions.yaml"))
        mp.setenv("DAGSTER_HOME", str(root / "dagster_home"))
        argv = ["demo", "--data", str(root), "--regions", str(ROOT / "regions.yaml")]
        code = main([*argv, "--train-epochs", "2"])
    assert code == 0, out.getvalue()[-4000:]
    return root, out.getvalue()


def external_ip() -> str:
    """This machine's address on its default route (not loopback); skips when none."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
            ip = str(s.getsockname()[0])
        except OSError:
            pytest.skip("no non-loopback address to probe")
    if ip.startswith("127."):
        pytest.skip("no non-loopback address to probe")
    return ip


def materialize(assets: Any, partition_key: str | None = None, **kwargs: Any) -> Any:
    """``dg.materialize`` with the partition added to the instance first (an ephemeral
    one unless ``instance=`` is given): partitions are dynamic (``assets.partitions``),
    so a key exists once the regions file's sync, or this, has added it."""
    import dagster as dg

    from assets.partitions import REGION_PERIODS_NAME, REGIONS

    instance = kwargs.pop("instance", None) or dg.DagsterInstance.ephemeral()
    if partition_key is not None:
        name = REGION_PERIODS_NAME if "|" in partition_key else REGIONS.name
        assert name is not None
        if not instance.has_dynamic_partition(name, partition_key):
            instance.add_dynamic_partitions(name, [partition_key])
    return dg.materialize(assets, partition_key=partition_key, instance=instance, **kwargs)


def persistent_instance(home: Path) -> Any:
    """A Dagster instance stored under ``home``, with an instance ref (schedules resolve
    dynamic partitions through it; an ephemeral one has none). Under the test's own
    folder: ``local_temp()``'s temporary folder goes when Dagster drops its last
    reference to the instance, sometimes mid-test. Not entered as a context manager:
    Dagster 1.13's ``__exit__`` leaves its defs-state storage set for the process."""
    import dagster as dg

    home.mkdir(parents=True, exist_ok=True)
    return dg.DagsterInstance.local_temp(str(home))
