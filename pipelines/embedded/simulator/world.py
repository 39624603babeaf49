"""The embedded Sentinel-2 world: a static STAC catalog of simulated L2A scenes.

``simulate_world`` writes, for one region and all its periods:

    <out>/catalog.json, collection.json       a relocatable static STAC catalog
    <out>/items/<id>.json                     Earth Search v1-style items (relative hrefs)
    <out>/cogs/<id>/{B02,...,B12,SCL}.tif     COGs (tiled, deflate, overviews)
    <out>/truth/<period>.tif                  true mining mask (1 mining, 2 re-vegetating)
    <out>/context/...                         demo context layers (see context.py)
    <out>/world.json                          grid, scenes and true areas per period

The same seed gives the same bytes. Items carry what the real ones carry and the
pipeline reads: asset keys ``blue green red nir swir16 swir22 scl``, ``raster:bands``
scale and offset, ``proj:*``, ``eo:cloud_cover``, ``s2:processing_baseline``, the MGRS
tile (``grid:code``, ``mgrs:*``). Optionally each period has one reprocessed ``_1_``
twin (baseline 05.00, offset -0.1) beside its ``_0_`` original, as on Earth Search.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pyproj import Transformer
from rasterio.crs import CRS
from rasterio.transform import Affine
from rasterio.windows import Window as RasterWindow

from pipelines.embedded.simulator.context import write_context
from pipelines.embedded.simulator.landscape import Landscape, build_landscape
from pipelines.embedded.simulator.scenes import (
    BANDS,
    BANDS_20M,
    L1C_BANDS,
    Acquisition,
    to_dn,
    toa_bands,
)
from pipelines.embedded.simulator.strips import STRIP_PX, Scratch
from pipelines.infra.grid import Window, mgrs_tile, window_for_bbox
from pipelines.infra.storage import atomic_dir
from pipelines.infra.tiling import gdal_cache, staged_cog
from pipelines.regions import EmbeddedSpec, Period, Region

COLLECTION = "sentinel-2-l2a"
L1C_COLLECTION = "sentinel-2-l1c"
#: Earth Search v1 asset keys of the L1C bands s2cloudless reads.
L1C_ASSET_KEYS = {
    "B01": "coastal", "B02": "blue", "B04": "red", "B05": "rededge1", "B08": "nir",
    "B8A": "nir08", "B09": "nir09", "B10": "cirrus", "B11": "swir16", "B12": "swir22",
}  # fmt: skip
WORLD_VERSION = 1  # bump when the simulator's output changes, to rebuild cached worlds
ASSET_KEYS = {
    "B02": "blue", "B03": "green", "B04": "red", "B08": "nir",
    "B11": "swir16", "B12": "swir22", "SCL": "scl",
}  # fmt: skip
BAND_INFO = {
    "B02": ("Blue (band 2)", 0.49, 0.098),
    "B03": ("Green (band 3)", 0.56, 0.045),
    "B04": ("Red (band 4)", 0.665, 0.038),
    "B08": ("NIR 1 (band 8)", 0.842, 0.145),
    "B11": ("SWIR 1 (band 11)", 1.61, 0.143),
    "B12": ("SWIR 2 (band 12)", 2.19, 0.242),
}
CLOUD_LEVELS = (0.02, 0.12, 0.3, 0.55, 0.08, 0.4, 0.2, 0.7)  # cycled through acquisitions
SENSING_TIME = dt.time(14, 56, 21, 24000)  # Sentinel-2's overpass of 19L, UTC
MARGIN_M = 200.0
#: GDAL's block cache while the simulator writes (strips complete their blocks in order).
CACHE_BYTES = 128 * 2**20
#: COG layout of the simulated bands (as Earth Search's: 256 px blocks, deflate with
#: horizontal differencing, GDAL's automatic overview levels).
COG_OPTIONS = {
    "COMPRESS": "DEFLATE", "LEVEL": 1, "PREDICTOR": "2", "BLOCKSIZE": 256,
    "OVERVIEW_COUNT": None, "OVERVIEWS": "AUTO",
}  # fmt: skip


@dataclass(frozen=True)
class WorldInfo:
    path: Path
    region: str
    mgrs_tile: str
    epsg: int
    window: dict[str, Any]
    items: list[str]
    mining_ha: dict[str, float]
    spec_hash: str


def spec_hash(region: Region) -> str:
    spec = region.embedded or EmbeddedSpec()
    doc = {
        "v": WORLD_VERSION,
        "bbox": region.bbox,
        "periods": [(p.id, p.start.isoformat(), p.end.isoformat()) for p in region.periods],
        "spec": spec.model_dump(),
    }
    if region.uses_s2cloudless:
        doc["l1c"] = True  # only then, so existing worlds keep their hash
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def baseline_for(date: dt.date) -> str:
    """The processing baseline ESA used for an acquisition date (first processing)."""
    if date < dt.date(2019, 11, 4):
        return "02.12"
    if date < dt.date(2021, 3, 30):
        return "02.14"
    if date < dt.date(2022, 1, 25):
        return "03.00"
    return "04.00"


def acquisition_dates(period: Period, n: int) -> list[dt.date]:
    """``n`` dates in the period; a calendar year gets the June-October dry season."""
    start, end = period.start, period.end
    if (end - start).days >= 360:
        start = dt.date(start.year, 6, 1)
        end = dt.date(start.year, 10, 31)
    span = (end - start).days
    return [start + dt.timedelta(days=round(span * (i + 0.5) / n)) for i in range(n)]


def simulate_world(
    region: Region,
    out: Path,
    progress: Callable[[str], None] | None = None,
    strip_px: int = STRIP_PX,
) -> WorldInfo:
    """Write the region's embedded world under ``out`` (replaced atomically).

    The world is built and written strip by strip (``pipelines.embedded.simulator.strips``):
    memory stays bounded whatever the region's size, and intermediate fields live in a
    scratch folder beside ``out`` that is removed at the end.
    """
    say = progress or (lambda _msg: None)
    spec = region.embedded or EmbeddedSpec()
    window = window_for_bbox(region.bbox, 10.0, margin_m=MARGIN_M)
    lon_c = (region.bbox[0] + region.bbox[2]) / 2
    lat_c = (region.bbox[1] + region.bbox[3]) / 2
    tile = mgrs_tile(lon_c, lat_c)
    shape = (window.height, window.width)
    to_lonlat = Transformer.from_crs(window.epsg, 4326, always_xy=True)
    footprint = _footprint(window, to_lonlat)
    pixel_ha = window.resolution**2 / 10_000
    n_scenes = len(region.periods) * spec.scenes_per_period

    item_ids: list[str] = []
    mining_ha: dict[str, float] = {}
    # GDAL's block cache holds the staged bands' dirty blocks until it is full: small here.
    with gdal_cache(CACHE_BYTES), atomic_dir(out) as tmp, _scratch(out) as scratch:
        say(
            f"building the landscape: {window.width} x {window.height} px "
            f"({window.width * window.height / 1e6:.1f} Mpx), {len(region.periods)} periods"
        )
        land = build_landscape(
            spec.seed,
            shape,
            len(region.periods),
            spec.growth_factor,
            scratch=scratch / "landscape",
            strip_px=strip_px,
        )
        rng = np.random.default_rng(spec.seed + 1)
        (tmp / "items").mkdir()
        (tmp / "truth").mkdir()
        k = 0
        for p_i, period in enumerate(region.periods):
            _write_truth(tmp / "truth" / f"{period.id}.tif", land, p_i, window)
            mining_ha[period.id] = round(float(land.mining_pixels(p_i)) * pixel_ha, 2)
            for a_i, date in enumerate(acquisition_dates(period, spec.scenes_per_period)):
                cloud = CLOUD_LEVELS[k % len(CLOUD_LEVELS)]
                k += 1
                acq = Acquisition(
                    land, p_i, rng, cloud, Scratch(scratch / f"scene{k}", land.strips)
                )
                platform = "sentinel-2a" if k % 2 else "sentinel-2b"
                versions = [(0, baseline_for(date))]
                if spec.reprocessed_twins and a_i == 0:
                    versions.append((1, "05.00"))
                products = [
                    (seq, baseline, *_new_product(tmp, platform, tile, date, seq, "L2A", baseline))
                    for seq, baseline in versions
                ]
                l1c = (
                    _new_product(tmp, platform, tile, date, 0, "L1C", versions[0][1])
                    if region.uses_s2cloudless
                    else None
                )
                _write_scene_rasters(acq, window, [p[2:] for p in products], l1c)
                acq.close()
                for seq, baseline, item_id, _offset, _dir in products:
                    item = _write_scene(
                        tmp, item_id, acq.cloud_cover, window, tile, date, platform, seq,
                        baseline, footprint,
                    )  # fmt: skip
                    item_ids.append(item["id"])
                if l1c is not None:
                    item = _write_l1c(
                        tmp, l1c[0], acq.cloud_cover, window, tile, date, platform,
                        versions[0][1], footprint,
                    )  # fmt: skip
                    item_ids.append(item["id"])
            say(f"simulated period {period.id}: {k} of {n_scenes} acquisitions written")
        write_context(tmp / "context", region, window, land, to_lonlat)
        land.close()
        info = {
            "region": region.id,
            "spec": spec.model_dump(),
            "spec_hash": spec_hash(region),
            "mgrs_tile": tile,
            "epsg": window.epsg,
            "window": asdict(window),
            "items": item_ids,
            "mining_ha": mining_ha,
            "truth_values": {
                "0": "no mining",
                "1": "active mining",
                "2": "re-vegetating old mining",
            },
        }
        (tmp / "world.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        _write_catalog(tmp, region, item_ids, footprint)
    return WorldInfo(
        path=out,
        region=region.id,
        mgrs_tile=tile,
        epsg=window.epsg,
        window=asdict(window),
        items=item_ids,
        mining_ha=mining_ha,
        spec_hash=spec_hash(region),
    )


@contextmanager
def _scratch(out: Path) -> Iterator[Path]:
    """A scratch folder beside ``out`` (named as ``remove_orphans`` expects, so a killed
    run's scratch is cleaned up by the next one), removed on exit."""
    out.parent.mkdir(parents=True, exist_ok=True)
    path = Path(
        tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", suffix=".scratch", dir=out.parent)
    )
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _cog(
    stack: ExitStack, path: Path, win: Window, dtype: str, nodata: int, categorical: bool
) -> Any:
    """A strip writer for one band, becoming a COG (tiled, deflate, overviews) on exit."""
    profile = {
        "driver": "GTiff",
        "width": win.width,
        "height": win.height,
        "count": 1,
        "dtype": dtype,
        "crs": CRS.from_epsg(win.epsg),
        "transform": Affine(*win.transform),
        "nodata": nodata,
    }
    return stack.enter_context(
        staged_cog(
            path,
            profile,
            gdal_overviews="NEAREST" if categorical else "AVERAGE",  # uint16, as Earth Search
            cog_options=COG_OPTIONS,
        )
    )


def _put(dst: Any, array: np.ndarray, row: int) -> None:
    dst.write(array, 1, window=RasterWindow(0, row, array.shape[1], array.shape[0]))


def _write_truth(path: Path, land: Landscape, period: int, window: Window) -> None:
    with ExitStack() as stack:
        dst = _cog(stack, path, window, "uint8", 255, categorical=True)
        for r0, r1 in land.strips:
            truth = land.mining(period, r0, r1).astype(np.uint8)
            truth[land.revegetating(period, r0, r1)] = 2
            _put(dst, truth, r0)


def _write_scene_rasters(
    acq: Acquisition,
    window: Window,
    products: list[tuple[str, float, Path]],
    l1c: tuple[str, float, Path] | None,
) -> None:
    """Render ``acq`` strip by strip into the bands of each L2A product (and the L1C)."""
    with ExitStack() as stack:
        l2a = []
        for _item_id, offset, cog_dir in products:
            bands = {}
            for band in (*BANDS, "SCL"):
                win = _band_window(window, band)
                dtype = "uint8" if band == "SCL" else "uint16"
                dst = _cog(stack, cog_dir / f"{band}.tif", win, dtype, 0, band == "SCL")
                bands[band] = (dst, int(win.resolution) // 10)
            l2a.append((offset, bands))
        toa_out = {}
        if l1c is not None:
            for band in L1C_BANDS:
                win = _l1c_window(window, band)
                dst = _cog(stack, l1c[2] / f"{band}.tif", win, "uint16", 0, False)
                toa_out[band] = (dst, int(win.resolution) // 10)
        for r0, r1 in acq.land.strips:
            refl, scl = acq.strip(r0, r1)
            for offset, bands in l2a:
                for band, (dst, f) in bands.items():
                    data = scl if band == "SCL" else to_dn(refl[band], offset)
                    _put(dst, data, r0 // f)
            if l1c is not None:
                for band, toa in toa_bands(refl).items():
                    dst, f = toa_out[band]
                    _put(dst, to_dn(toa, l1c[1]), r0 // f)


def _footprint(window: Window, to_lonlat: Transformer) -> dict[str, Any]:
    x0, y0, x1, y1 = window.bounds
    xs = [x0, x1, x1, x0, x0]
    ys = [y0, y0, y1, y1, y0]
    lon, lat = to_lonlat.transform(xs, ys)
    ring = [[round(a, 9), round(b, 9)] for a, b in zip(lon, lat, strict=True)]
    return {"type": "Polygon", "coordinates": [ring]}


def boa_offset(baseline: str) -> float:
    """The DN offset of a processing baseline (-0.1 from 04.00 on)."""
    return -0.1 if float(baseline) >= 4.0 else 0.0


def _band_window(window: Window, band: str) -> Window:
    """An L2A band's grid: 10 m, or 20 m for B11, B12 and SCL."""
    return window.at(20 if band in BANDS_20M or band == "SCL" else 10)


def _l1c_window(window: Window, band: str) -> Window:
    """An L1C band's grid at its native resolution, covering the 10 m window whole."""
    res = L1C_BANDS[band]
    f = res // 10
    return Window(
        window.epsg, window.x0, window.y0, -(-window.width // f), -(-window.height // f), res
    )


def _new_product(
    root: Path, platform: str, tile: str, date: dt.date, seq: int, level: str, baseline: str
) -> tuple[str, float, Path]:
    """Item id (Earth Search style), DN offset for the baseline, and a fresh COG folder."""
    item_id = f"S2{platform[-1].upper()}_{tile}_{date:%Y%m%d}_{seq}_{level}"
    offset = boa_offset(baseline)
    cog_dir = root / "cogs" / item_id
    cog_dir.mkdir(parents=True)
    return item_id, offset, cog_dir


def _write_scene(
    root: Path,
    item_id: str,
    cloud_cover: float,
    window: Window,
    tile: str,
    date: dt.date,
    platform: str,
    seq: int,
    baseline: str,
    footprint: dict[str, Any],
) -> dict[str, Any]:
    """The item of an L2A product whose COGs are written."""
    offset = boa_offset(baseline)
    assets: dict[str, Any] = {}
    for band in (*BANDS, "SCL"):
        win = _band_window(window, band)
        res = int(win.resolution)
        asset: dict[str, Any] = {
            "href": f"../cogs/{item_id}/{band}.tif",
            "type": "image/tiff; application=geotiff; profile=cloud-optimized",
            "roles": ["data", "reflectance"] if band != "SCL" else ["data"],
            "proj:shape": [win.height, win.width],
            "proj:transform": list(win.transform),
        }
        if band == "SCL":
            asset["raster:bands"] = [{"nodata": 0, "data_type": "uint8", "spatial_resolution": 20}]
            asset["title"] = "Scene classification map (SCL)"
        else:
            title, wl, fwhm = BAND_INFO[band]
            key = ASSET_KEYS[band]
            asset["title"] = title
            asset["eo:bands"] = [
                {"name": key, "common_name": key, "description": title,
                 "center_wavelength": wl, "full_width_half_max": fwhm}
            ]  # fmt: skip
            asset["raster:bands"] = [
                {"nodata": 0, "data_type": "uint16", "bits_per_sample": 15,
                 "spatial_resolution": res, "scale": 0.0001, "offset": offset}
            ]  # fmt: skip
        assets[ASSET_KEYS[band]] = asset
    when = dt.datetime.combine(date, SENSING_TIME, tzinfo=dt.UTC)
    stamp = when.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    zone, band_letter, square = int(tile[:2]), tile[2], tile[3:]
    product = (
        f"S2{platform[-1].upper()}_MSIL2A_{when:%Y%m%dT%H%M%S}_N{baseline.replace('.', '')}"
        f"_R010_T{tile}_{when:%Y%m%dT%H%M%S}.SAFE"
    )
    bbox = _bbox(footprint)
    item = {
        "type": "Feature",
        "stac_version": "1.0.0",
        "stac_extensions": [
            "https://stac-extensions.github.io/eo/v1.1.0/schema.json",
            "https://stac-extensions.github.io/projection/v1.1.0/schema.json",
            "https://stac-extensions.github.io/raster/v1.1.0/schema.json",
            "https://stac-extensions.github.io/mgrs/v1.0.0/schema.json",
            "https://stac-extensions.github.io/grid/v1.1.0/schema.json",
        ],
        "id": item_id,
        "collection": COLLECTION,
        "bbox": bbox,
        "geometry": footprint,
        "properties": {
            "created": stamp,
            "datetime": stamp,
            "platform": platform,
            "constellation": "sentinel-2",
            "instruments": ["msi"],
            "eo:cloud_cover": cloud_cover,
            "proj:epsg": window.epsg,
            "mgrs:utm_zone": zone,
            "mgrs:latitude_band": band_letter,
            "mgrs:grid_square": square,
            "grid:code": f"MGRS-{tile}",
            "s2:product_type": "S2MSI2A",
            "s2:processing_baseline": baseline,
            "s2:product_uri": product,
            "s2:sequence": str(seq),
            "earthsearch:boa_offset_applied": offset != 0.0,
            "asmwatch:simulated": True,
        },
        "links": [
            {"rel": "root", "href": "../catalog.json", "type": "application/json"},
            {"rel": "collection", "href": "../collection.json", "type": "application/json"},
            {"rel": "parent", "href": "../collection.json", "type": "application/json"},
        ],
        "assets": assets,
    }
    (root / "items" / f"{item_id}.json").write_text(
        json.dumps(item, indent=1, sort_keys=True) + "\n"
    )
    return item


def _write_l1c(
    root: Path,
    item_id: str,
    cloud_cover: float,
    window: Window,
    tile: str,
    date: dt.date,
    platform: str,
    baseline: str,
    footprint: dict[str, Any],
) -> dict[str, Any]:
    """The item of the L1C twin of an acquisition (Earth Search v1 ``sentinel-2-l1c``
    keys), whose COGs are written."""
    offset = boa_offset(baseline)
    assets: dict[str, Any] = {}
    for band, res in L1C_BANDS.items():
        win = _l1c_window(window, band)
        assets[L1C_ASSET_KEYS[band]] = {
            "href": f"../cogs/{item_id}/{band}.tif",
            "type": "image/tiff; application=geotiff; profile=cloud-optimized",
            "roles": ["data", "reflectance"],
            "eo:bands": [{"name": band}],
            "proj:shape": [win.height, win.width],
            "proj:transform": list(win.transform),
            "raster:bands": [
                {"nodata": 0, "data_type": "uint16", "spatial_resolution": res,
                 "scale": 0.0001, "offset": offset}
            ],
        }  # fmt: skip
    when = dt.datetime.combine(date, SENSING_TIME, tzinfo=dt.UTC)
    stamp = when.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    item = {
        "type": "Feature",
        "stac_version": "1.0.0",
        "stac_extensions": [],
        "id": item_id,
        "collection": L1C_COLLECTION,
        "bbox": _bbox(footprint),
        "geometry": footprint,
        "properties": {
            "datetime": stamp,
            "platform": platform,
            "constellation": "sentinel-2",
            "eo:cloud_cover": cloud_cover,
            "proj:epsg": window.epsg,
            "grid:code": f"MGRS-{tile}",
            "s2:product_type": "S2MSI1C",
            "s2:processing_baseline": baseline,
            "asmwatch:simulated": True,
        },
        "links": [],
        "assets": assets,
    }
    (root / "items" / f"{item_id}.json").write_text(
        json.dumps(item, indent=1, sort_keys=True) + "\n"
    )
    return item


def _bbox(geom: dict[str, Any]) -> list[float]:
    xs = [c[0] for c in geom["coordinates"][0]]
    ys = [c[1] for c in geom["coordinates"][0]]
    return [min(xs), min(ys), max(xs), max(ys)]


def _write_catalog(
    root: Path, region: Region, item_ids: list[str], footprint: dict[str, Any]
) -> None:
    dates = sorted(i.split("_")[2] for i in item_ids)
    start = f"{dates[0][:4]}-{dates[0][4:6]}-{dates[0][6:]}T00:00:00Z"
    end = f"{dates[-1][:4]}-{dates[-1][4:6]}-{dates[-1][6:]}T23:59:59Z"
    collection = {
        "type": "Collection",
        "stac_version": "1.0.0",
        "id": COLLECTION,
        "title": f"Simulated Sentinel-2 L2A over {region.name}",
        "description": "asmwatch's embedded world: simulated Sentinel-2 L2A scenes in the "
        "Earth Search v1 schema, for the demo and the tests. Not real imagery.",
        "license": "CC-BY-4.0",
        "extent": {
            "spatial": {"bbox": [_bbox(footprint)]},
            "temporal": {"interval": [[start, end]]},
        },
        "links": [
            {"rel": "root", "href": "./catalog.json", "type": "application/json"},
            {"rel": "parent", "href": "./catalog.json", "type": "application/json"},
            *[
                {"rel": "item", "href": f"./items/{i}.json", "type": "application/geo+json"}
                for i in item_ids
            ],
        ],
    }
    catalog = {
        "type": "Catalog",
        "stac_version": "1.0.0",
        "id": f"asmwatch-embedded-{region.id}",
        "description": f"asmwatch embedded world for region {region.id}",
        "links": [
            {"rel": "root", "href": "./catalog.json", "type": "application/json"},
            {"rel": "child", "href": "./collection.json", "type": "application/json"},
        ],
    }
    (root / "collection.json").write_text(json.dumps(collection, indent=1, sort_keys=True) + "\n")
    (root / "catalog.json").write_text(json.dumps(catalog, indent=1, sort_keys=True) + "\n")


def load_items(world: Path) -> list[dict[str, Any]]:
    """The world's items with absolute ``file://`` asset hrefs, ready to serve."""
    items = []
    for path in sorted((world / "items").glob("*.json")):
        item = json.loads(path.read_text())
        for asset in item["assets"].values():
            asset["href"] = (path.parent / asset["href"]).resolve().as_uri()
        item["links"] = []
        items.append(item)
    return items
