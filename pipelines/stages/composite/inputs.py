"""Inputs: the composite's bands and types, the region's grid and mask, the scene
items and their files (checked, signed, grouped into observations), GDAL's settings
for remote files, and the redaction of signed hrefs in GDAL's messages.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import numpy as np
import numpy.typing as npt
import rasterio
import rasterio.features
import rasterio.windows
import shapely
import shapely.geometry
from pyproj import Transformer

from pipelines.infra.grid import window_for_bbox
from pipelines.stages.stac.l1c import S2CLOUDLESS_BANDS

if TYPE_CHECKING:
    from odc.geo.geobox import GeoBox

    from pipelines.regions import Region


#: Output reflectance bands and the canonical asset role each comes from.
BAND_ROLES: dict[str, str] = {
    "B02": "blue", "B03": "green", "B04": "red", "B08": "nir", "B11": "swir16", "B12": "swir22",
}  # fmt: skip
REFLECTANCE_BANDS: tuple[str, ...] = tuple(BAND_ROLES)
COUNT_BAND = "clear_count"
INDEX_BANDS: tuple[str, ...] = ("NDVI", "MNDWI", "BSI")
OUTPUT_BANDS: tuple[str, ...] = (*REFLECTANCE_BANDS, COUNT_BAND, *INDEX_BANDS)
#: SCL classes never used: nodata, saturated/defective, cloud shadow, cloud medium and
#: high probability, thin cirrus.
MASKED_SCL: tuple[int, ...] = (0, 1, 3, 8, 9, 10)
LOAD_ROLES: tuple[str, ...] = (*BAND_ROLES.values(), "scl")
#: The L1C twin's bands for s2cloudless, as the scenes stage names them in an item.
L1C_ROLES: tuple[str, ...] = tuple(f"l1c_{b}" for b in S2CLOUDLESS_BANDS)
CLOUD_MASKS: tuple[str, ...] = ("scl", "scl+s2cloudless")
DEFAULT_RESOLUTION = 10.0
DEFAULT_CHUNK = 1024
#: GDAL settings for remote COGs (Earth Search's bucket over https, a blob store, S3),
#: for the scene check and the block reads alike: no directory listing on open (S3
#: answers it with an error, one wasted round trip per file) and 10 retries with a
#: growing delay on 429/500/502/503/504 (S3's "SlowDown"). odc-stac's
#: ``configure_rio(cloud_defaults=True)`` sets the same; naming them here keeps the
#: check's reads and the load's alike.
REMOTE_GDAL: dict[str, str] = {
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
    "GDAL_HTTP_MAX_RETRY": "10",
    "GDAL_HTTP_RETRY_DELAY": "0.5",
}


def aws_signed() -> bool:
    """Whether s3:// reads are signed: when the environment carries AWS credentials
    (``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``) or agrees to pay for requests
    (``AWS_REQUEST_PAYER=requester``, for Earth Search's requester-pays L1C bucket).
    Otherwise they are unsigned: public buckets need no credentials, and GDAL does not
    wait on the EC2 metadata service looking for some. GDAL reads the credentials and
    the payer header from the environment itself (of every dask worker, too)."""
    return bool(
        os.environ.get("AWS_ACCESS_KEY_ID")
        or os.environ.get("AWS_PROFILE")
        or os.environ.get("AWS_REQUEST_PAYER") == "requester"
    )


def remote_gdal() -> dict[str, str]:
    """``REMOTE_GDAL``, plus unsigned S3 requests unless ``aws_signed()``."""
    return REMOTE_GDAL if aws_signed() else {**REMOTE_GDAL, "AWS_NO_SIGN_REQUEST": "YES"}


GROUP_PROPERTY = "asmwatch:observation"

BAND_DESCRIPTIONS: dict[str, str] = {
    "B02": "median surface reflectance, blue (B02)",
    "B03": "median surface reflectance, green (B03)",
    "B04": "median surface reflectance, red (B04)",
    "B08": "median surface reflectance, NIR (B08)",
    "B11": "median surface reflectance, SWIR 1.6 um (B11)",
    "B12": "median surface reflectance, SWIR 2.2 um (B12)",
    COUNT_BAND: "number of clear observations (SCL not 0, 1, 3, 8, 9, 10)",
    "NDVI": "(B08 - B04) / (B08 + B04)",
    "MNDWI": "(B03 - B11) / (B03 + B11)",
    "BSI": "((B11 + B04) - (B08 + B02)) / ((B11 + B04) + (B08 + B02))",
}


class CompositeError(ValueError):
    """A composite that cannot be built; the message names the input and the problem."""


@dataclass(frozen=True)
class SkippedScene:
    id: str
    reason: str


@dataclass(frozen=True)
class Observation:
    """One time step of the stack: the scenes of one pass, sharing scale and offset."""

    key: str
    date: dt.date
    scene_ids: tuple[str, ...]
    scale: Mapping[str, float]
    offset: Mapping[str, float]
    #: scale/offset of the L1C twin's bands (s2cloudless); empty without a twin.
    l1c_scale: Mapping[str, float] = field(default_factory=dict)
    l1c_offset: Mapping[str, float] = field(default_factory=dict)


@dataclass
class CompositeResult:
    path: Path
    region: str
    period: str
    epsg: int
    shape: tuple[int, int]
    resolution: float
    scenes_used: list[str]
    skipped: list[SkippedScene]
    observations: int
    valid_fraction: float
    clear_count_stats: dict[str, float]
    clear_count_histogram: dict[int, int]
    band_means: dict[str, float]
    size_bytes: int
    seconds: float
    empty: bool
    read_failures: list[str] = field(default_factory=list)
    cloud_mask: str = "scl"
    l1c_scenes: int = 0  # scenes whose L1C twin fed s2cloudless
    l1c_notes: list[str] = field(default_factory=list)  # twins dropped, and why

    def summary(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "region": self.region,
            "period": self.period,
            "epsg": self.epsg,
            "shape": list(self.shape),
            "resolution_m": self.resolution,
            "scene_count": len(self.scenes_used),
            "observations": self.observations,
            "skipped": [{"id": s.id, "reason": s.reason} for s in self.skipped],
            "valid_fraction": round(self.valid_fraction, 6),
            "clear_count": self.clear_count_stats,
            "size_bytes": self.size_bytes,
            "seconds": round(self.seconds, 2),
            "empty": self.empty,
            "cloud_mask": self.cloud_mask,
            "l1c_scenes": self.l1c_scenes,
        }


# --------------------------------------------------------------------------- grid


def region_geobox(region: Region, resolution: float = DEFAULT_RESOLUTION) -> GeoBox:
    """The region's composite grid: UTM zone of the AOI centre, snapped to the S2 grid."""
    from affine import Affine
    from odc.geo.geobox import GeoBox

    w = window_for_bbox(region.bbox, resolution=resolution)
    return GeoBox((w.height, w.width), Affine(*w.transform), f"EPSG:{w.epsg}")


def aoi_mask(
    geometry: Mapping[str, Any], geobox: GeoBox, window: rasterio.windows.Window | None = None
) -> npt.NDArray[np.bool_]:
    """True where a pixel of ``geobox`` (or of ``window`` in it) lies inside the AOI."""
    epsg = geobox.crs.epsg if geobox.crs is not None else None
    if epsg is None:
        raise CompositeError(f"composite grid CRS {geobox.crs} has no EPSG code")
    to_utm = Transformer.from_crs(4326, epsg, always_xy=True).transform
    geom = shapely.transform(shapely.geometry.shape(geometry), to_utm, interleaved=False)
    transform = geobox.affine
    shape = geobox.shape.yx
    if window is not None:
        transform = rasterio.windows.transform(window, transform)
        shape = (int(window.height), int(window.width))
    return rasterio.features.geometry_mask(
        [shapely.geometry.mapping(geom)], out_shape=shape, transform=transform, invert=True
    )


# --------------------------------------------------------------------------- scenes


def read_scene_items(path: Path) -> list[dict[str, Any]]:
    """The normalised items stored by the scenes stage (stac-geoparquet).

    Relative asset hrefs (the embedded world's files, stored relative to the scenes
    file so the data root can move) come back as absolute paths beside it.
    """
    import asyncio

    import rustac

    if not path.exists():
        raise FileNotFoundError(f"scenes file {path} does not exist")

    async def _read() -> dict[str, Any]:
        return await rustac.read(str(path))

    items = list(asyncio.run(_read())["features"])
    base = path.resolve().parent
    for item in items:
        for asset in item["assets"].values():
            href = asset["href"]
            if "://" not in href and not href.startswith("/"):
                asset["href"] = str((base / href).resolve())
    return items


def _is_local(href: str) -> bool:
    return href.startswith("file://") or "://" not in href


def _href_path(href: str) -> str:
    """A path rasterio opens: file:// URLs decoded (``%2B`` is ``+``), others as given."""
    if href.startswith("file://"):
        return unquote(urlsplit(href).path)
    return href


def _check_asset(href: str, role: str) -> str | None:
    """None if the asset opens and its last full-resolution block reads, else why not."""
    try:
        with rasterio.Env(**({} if _is_local(href) else remote_gdal())), rasterio.open(_href_path(href)) as src:  # fmt: skip
            if src.crs is None:
                return f"{role}: {href} has no CRS"
            h, w = src.block_shapes[0]
            win = rasterio.windows.Window(
                (src.width - 1) // w * w, (src.height - 1) // h * h,
                min(w, src.width - (src.width - 1) // w * w),
                min(h, src.height - (src.height - 1) // h * h),
            )  # fmt: skip
            src.read(1, window=win)
    except (rasterio.errors.RasterioError, OSError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        return redact(f"{role}: {href}: {first}")
    return None


_QUERY = re.compile(r"(https?://[^\s?'\"]+)\?[^\s'\"]*")


def redact(text: str) -> str:
    """Drop URL query strings (SAS tokens, signatures) from a message: logs and
    Dagster metadata are not the place for credentials."""
    return _QUERY.sub(r"\1?<signed>", text)


class _Redacting(logging.Filter):
    """Redacts URL query strings from the records of a logger (``redact``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if "?" in msg:
            record.msg, record.args = redact(msg), None
        return True


#: Loggers through which rasterio passes GDAL's messages. GDAL names the file it failed
#: on, signed href included ("HTTP response code on https://...?...&sig=...: 0"), and
#: rasterio logs that at WARNING: those records are redacted before any handler sees
#: them (a logger's filters run first).
GDAL_LOGGERS = ("rasterio", "rasterio._env", "rasterio._err", "rasterio._base", "rasterio._io", "rasterio.env")  # fmt: skip
for _name in GDAL_LOGGERS:
    logging.getLogger(_name).addFilter(_Redacting())


def check_scene_files(
    items: Sequence[Mapping[str, Any]], roles: Sequence[str] = LOAD_ROLES, workers: int = 8
) -> tuple[list[Mapping[str, Any]], list[SkippedScene]]:
    """Split items into readable ones and skipped ones (missing role, file or block).

    Opening each file and reading its last block catches missing, truncated and
    non-TIFF files before dask does; cheap next to the load itself.
    """

    def check(item: Mapping[str, Any]) -> str | None:
        assets = item.get("assets", {})
        missing = [r for r in roles if r not in assets]
        if missing:
            return f"no asset for {', '.join(missing)}"
        problems = [p for r in roles if (p := _check_asset(assets[r]["href"], r))]
        if not problems:
            return None
        more = f" (and {len(problems) - 1} more unreadable)" if len(problems) > 1 else ""
        return problems[0] + more

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        verdicts = list(pool.map(check, items))
    ok = [it for it, v in zip(items, verdicts, strict=True) if v is None]
    skipped = [
        SkippedScene(str(it.get("id")), v) for it, v in zip(items, verdicts, strict=True) if v
    ]
    return ok, skipped


def _check_l1c(
    items: Sequence[Mapping[str, Any]],
) -> tuple[list[Mapping[str, Any]], list[str]]:
    """Keep L1C twins whose files read; strip unreadable ones (SCL alone for that scene)."""
    with_twin = [i for i in items if L1C_ROLES[0] in i["assets"]]
    _, bad = check_scene_files(with_twin, roles=L1C_ROLES)
    reasons = {b.id: b.reason for b in bad}
    out: list[Mapping[str, Any]] = []
    for item in items:
        if str(item.get("id")) in reasons:
            assets = {k: v for k, v in item["assets"].items() if k not in L1C_ROLES}
            item = {**item, "assets": assets}
        out.append(item)
    notes = [f"L1C twin of {i} unusable, SCL only: {r}" for i, r in reasons.items()]
    return out, notes


def _band_scale_offset(item: Mapping[str, Any], role: str) -> tuple[float, float]:
    bands = item["assets"][role].get("raster:bands") or [{}]
    return float(bands[0].get("scale", 1e-4)), float(bands[0].get("offset", 0.0))


def plan_observations(
    items: Sequence[Mapping[str, Any]], lon: float
) -> tuple[list[dict[str, Any]], list[Observation]]:
    """Group items into observations: same solar day at ``lon`` and same scale/offset.

    Returns copies of the items tagged with their group key (``asmwatch:observation``)
    and the observations in the order odc-stac stacks them (sorted by key).
    """
    groups: dict[str, list[Mapping[str, Any]]] = {}
    tagged: list[dict[str, Any]] = []
    for item in items:
        when = dt.datetime.fromisoformat(str(item["properties"]["datetime"]).replace("Z", "+00:00"))
        solar_day = (when + dt.timedelta(hours=lon / 15.0)).date()
        so = [_band_scale_offset(item, r) for r in BAND_ROLES.values()]
        key = solar_day.isoformat() + "|" + ",".join(f"{s:.6g}:{o:.6g}" for s, o in so)
        groups.setdefault(key, []).append(item)
        copy = dict(item)
        copy["properties"] = {**item["properties"], GROUP_PROPERTY: key}
        tagged.append(copy)
    observations = []
    for key in sorted(groups):
        first = groups[key][0]
        twin = next((i for i in groups[key] if L1C_ROLES[0] in i["assets"]), None)
        l1c = {r: _band_scale_offset(twin, r) for r in L1C_ROLES} if twin else {}
        observations.append(
            Observation(
                key=key,
                date=dt.date.fromisoformat(key.split("|")[0]),
                scene_ids=tuple(str(i["id"]) for i in groups[key]),
                scale={b: _band_scale_offset(first, r)[0] for b, r in BAND_ROLES.items()},
                offset={b: _band_scale_offset(first, r)[1] for b, r in BAND_ROLES.items()},
                l1c_scale={r: so[0] for r, so in l1c.items()},
                l1c_offset={r: so[1] for r, so in l1c.items()},
            )
        )
    return tagged, observations
