"""The composite stage: cloud-masked per-period median composites built with dask.

Third step of the flow (STAC -> scenes -> **composite** -> probability -> sites). Input:
the normalised scene items of a region and period (``scenes/<region>/<period>.parquet``).
Output: one tiled, deflated COG with overviews at ``composite/<region>/<period>.tif`` on
the region's UTM grid at 10 m, bands in this order:

    B02 B03 B04 B08 B11 B12   median surface reflectance of the clear observations
    clear_count               number of clear observations (0 where none)
    NDVI MNDWI BSI            indices computed from the median bands

How, and why this way:

* odc-stac loads every scene onto one GeoBox (the UTM zone of the AOI's centre, so a
  region spanning two zones or several MGRS tiles gets one grid). Reflectance bands are
  resampled bilinearly (20 m B11/B12 to 10 m), SCL by nearest neighbour. Scenes of the
  same pass (same solar day, same offset) are fused into one observation.
* The mask is Sen2Cor's SCL: 0 nodata, 1 saturated/defective, 3 cloud shadow, 8 and 9
  cloud, 10 thin cirrus are never used.
* Raw DN stay uint16 through the reduction; each scene's scale/offset is applied by
  shifting its DN onto one offset (``pipelines.median``), and reflectance is
  ``median_dn * scale + offset`` at the end.
* Chunks are square in space and whole in time, so each dask task holds one block of
  every scene and memory stays bounded by the chunk size, not by the AOI.
* A scene whose files are missing or unreadable is skipped, named in the result, and
  the composite still lands; a period with no scenes writes an all-nodata composite
  marked ``empty``.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
import re
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
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

from pipelines.grid import window_for_bbox
from pipelines.layout import composite_path
from pipelines.median import masked_median_dn, masked_median_float
from pipelines.progress import Progress
from pipelines.stac.l1c import S2CLOUDLESS_BANDS
from pipelines.tiling import staged_cog

if TYPE_CHECKING:
    import dask.array
    import xarray as xr
    from distributed import Client
    from odc.geo.geobox import GeoBox

    from pipelines.regions import Period, Region
    from pipelines.stac.signing import PlanetaryComputerSigner

log = logging.getLogger(__name__)
# odc-loader warps 20 m bands into bare numpy buffers; GDAL then notes, harmlessly, that
# the in-memory destination has no geotransform of its own.
warnings.filterwarnings(
    "ignore", category=rasterio.errors.NotGeoreferencedWarning, module="rasterio.warp"
)

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


def signer_for(
    items: Sequence[Mapping[str, Any]], subscription_key: str | None = None
) -> PlanetaryComputerSigner | None:
    """A Planetary Computer signer when any of the items' hrefs needs one, else None."""
    from pipelines.stac.signing import PlanetaryComputerSigner, needs_signing

    if any(needs_signing(a["href"]) for i in items for a in i["assets"].values()):
        return PlanetaryComputerSigner(subscription_key=subscription_key or None)
    return None


def signed_item(item: Mapping[str, Any], sign: Callable[[str], str]) -> dict[str, Any]:
    """The item with every asset href passed through ``sign`` (Planetary Computer SAS)."""
    assets = {k: {**a, "href": sign(a["href"])} for k, a in item["assets"].items()}
    return {**item, "assets": assets}


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


# --------------------------------------------------------------------------- load


def load_stack(
    items: Sequence[Mapping[str, Any]],
    geobox: GeoBox,
    *,
    chunk: int = DEFAULT_CHUNK,
    resampling: str = "bilinear",
    s2cloudless: bool = False,
) -> xr.Dataset:
    """Lazy (time, y, x) DN stack of the reflectance roles and SCL on ``geobox``.

    ``items`` must be tagged by ``plan_observations``; each time step is one observation.
    Read errors become nodata (``fail_on_error=False``) and are logged by odc-loader;
    ``build_composite`` collects those messages.
    """
    import odc.stac
    import pystac

    if any(not _is_local(a["href"]) for raw in items for a in raw["assets"].values()):
        # Remote COGs (Earth Search on S3 over https, a blob store): GDAL settings for
        # range reads (no directory listing, retries; S3 unsigned unless the environment
        # has credentials). odc-stac captures them into the graph, so dask workers
        # elsewhere read with them too.
        aws = None if aws_signed() else {"aws_unsigned": True}
        odc.stac.configure_rio(cloud_defaults=True, aws=aws, **REMOTE_GDAL)  # type: ignore[arg-type]
    if s2cloudless:
        # odc-stac takes the band list from the first item: start with one that has
        # an L1C twin (grouping and fusing order do not depend on this order).
        items = sorted(items, key=lambda i: L1C_ROLES[0] not in i["assets"])
    stac_items = []
    for raw in items:
        # rasterio does not percent-decode file:// URLs (a data root with '+' or a space
        # would not open): hand odc-stac plain paths for local files.
        assets = {
            k: {**a, "href": _href_path(a["href"])} if _is_local(a["href"]) else a
            for k, a in raw["assets"].items()
        }
        item = pystac.Item.from_dict({**raw, "assets": assets}, preserve_dict=True)
        item.clear_links("self")
        stac_items.append(item)
    return odc.stac.load(
        stac_items,
        bands=[*LOAD_ROLES, *(L1C_ROLES if s2cloudless else ())],
        geobox=geobox,
        groupby=GROUP_PROPERTY,
        chunks={"time": 1, "y": chunk, "x": chunk},
        resampling={"scl": "nearest", "*": resampling},
        fail_on_error=False,
    )


# --------------------------------------------------------------------------- reduce


def _dn_shifts(
    observations: Sequence[Observation], band: str
) -> tuple[list[int], float, float] | None:
    """Per-observation DN shifts onto the lowest offset, or None if not whole DN."""
    scales = {o.scale[band] for o in observations}
    if len(scales) != 1:
        return None
    scale = scales.pop()
    ref = min(o.offset[band] for o in observations)
    shifts = []
    for o in observations:
        s = (o.offset[band] - ref) / scale
        if abs(s - round(s)) > 1e-6:
            return None
        shifts.append(round(s))
    return shifts, scale, ref


def clear_mask(scl: npt.NDArray[np.uint8]) -> npt.NDArray[np.bool_]:
    """True where SCL says the observation is usable."""
    return ~np.isin(scl, MASKED_SCL)


def _ratio(a: npt.NDArray[np.float32], b: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    with np.errstate(divide="ignore", invalid="ignore"):
        out = (a - b) / (a + b)
    out[~np.isfinite(out)] = np.nan
    return out.astype(np.float32)


def composite_block(
    scl: npt.NDArray[np.uint8],
    *bands: npt.NDArray[np.uint16],
    observations: Sequence[Observation],
    s2cloudless: bool = False,
) -> npt.NDArray[np.float32]:
    """One spatial block: (t, y, x) SCL and DN per band -> (10, y, x) output bands.

    With ``s2cloudless``, ``bands`` continues with the ten L1C bands (``L1C_ROLES``).
    """
    clear = clear_mask(scl)
    if s2cloudless:
        l1c_dn = bands[len(REFLECTANCE_BANDS) :]
        bands = bands[: len(REFLECTANCE_BANDS)]
        clear &= ~_s2cloudless_block(l1c_dn, observations)
    out = np.empty((len(OUTPUT_BANDS), *scl.shape[1:]), dtype=np.float32)
    for i, (name, dn) in enumerate(zip(REFLECTANCE_BANDS, bands, strict=True)):
        plan = _dn_shifts(observations, name)
        if plan is not None:
            shifts, scale, ref = plan
            try:
                med, _ = masked_median_dn(dn, clear, shifts)
                out[i] = med * np.float32(scale) + np.float32(ref)
                continue
            except OverflowError:
                pass
        scale_t = np.array([o.scale[name] for o in observations], np.float32)[:, None, None]
        offset_t = np.array([o.offset[name] for o in observations], np.float32)[:, None, None]
        med, _ = masked_median_float(dn * scale_t + offset_t, clear & (dn != 0))
        out[i] = med
    out[len(REFLECTANCE_BANDS)] = clear.sum(axis=0)
    b02, b03, b04, b08, b11, _ = out[: len(REFLECTANCE_BANDS)]
    j = len(REFLECTANCE_BANDS) + 1
    out[j] = _ratio(b08, b04)
    out[j + 1] = _ratio(b03, b11)
    out[j + 2] = _ratio(b11 + b04, b08 + b02)
    return out


def _s2cloudless_block(
    l1c_dn: Sequence[npt.NDArray[np.uint16]], observations: Sequence[Observation]
) -> npt.NDArray[np.bool_]:
    from pipelines.cloudmask import decimate, s2cloudless_mask

    small = [decimate(dn) for dn in l1c_dn]  # the classifier runs at a coarser step
    toa = np.empty((small[0].shape[0], len(L1C_ROLES), *small[0].shape[1:]), np.float32)
    for j, (role, dn) in enumerate(zip(L1C_ROLES, small, strict=True)):
        scale = np.array([o.l1c_scale.get(role, 1e-4) for o in observations], np.float32)
        offset = np.array([o.l1c_offset.get(role, 0.0) for o in observations], np.float32)
        toa[:, j] = dn * scale[:, None, None] + offset[:, None, None]
    available = np.ones(l1c_dn[0].shape, dtype=bool)
    for dn in l1c_dn:
        available &= dn != 0
    return s2cloudless_mask(toa, available)


def composite_array(
    ds: xr.Dataset, observations: Sequence[Observation], s2cloudless: bool = False
) -> dask.array.Array:
    """The lazy (10, y, x) float32 composite of a loaded stack."""
    import dask.array as da

    if ds.sizes["time"] != len(observations):
        raise CompositeError(
            f"stack has {ds.sizes['time']} time steps but {len(observations)} observations"
        )
    arrays: list[Any] = [ds["scl"].data]
    arrays += [ds[role].data for role in BAND_ROLES.values()]
    if s2cloudless:
        arrays += [ds[role].data for role in L1C_ROLES]
    args: list[Any] = []
    for a in arrays:
        args += [a, "tyx"]
    return da.blockwise(
        composite_block,
        "byx",
        *args,
        new_axes={"b": len(OUTPUT_BANDS)},
        concatenate=True,
        dtype=np.float32,
        observations=list(observations),
        s2cloudless=s2cloudless,
        meta=np.empty((0, 0, 0), dtype=np.float32),
    )


def naive_composite(ds: xr.Dataset, observations: Sequence[Observation]) -> xr.Dataset:
    """What a user writes by hand: reflectance, ``where(clear)``, ``median("time")``.

    The baseline of bench/composite.py; also a cross-check of ``composite_block``.
    """
    import xarray as xr

    clear = ~ds["scl"].isin(list(MASKED_SCL))
    out = {}
    for band, role in BAND_ROLES.items():
        scale = xr.DataArray([o.scale[band] for o in observations], dims="time")
        offset = xr.DataArray([o.offset[band] for o in observations], dims="time")
        dn = ds[role]
        refl = (dn.astype("float32") * scale + offset).where(dn != 0)
        out[band] = refl.where(clear).median("time")
    return xr.Dataset(out)


def task_bytes(chunk: int, observations: int, s2cloudless: bool = False) -> int:
    """Estimated peak bytes of one ``composite_block`` task on a ``chunk``-px block.

    Per pixel: the 7 input stacks (uint16/uint8, counted at 2 bytes) held by dask and
    their concatenated copies, the working copy, clear and valid masks of one band, and
    the 10 float32 outputs with their temporaries.
    """
    stacks = 7 + (len(L1C_ROLES) if s2cloudless else 0)
    # s2cloudless adds its float32 TOA copy at 1/16 of the pixels, and its mask.
    extra = (len(L1C_ROLES) * 4 // 16 + 1) if s2cloudless else 0
    per_pixel = observations * (stacks * 2 * 2 + 2 + 1 + 1 + extra) + 10 * 4 * 2
    return chunk * chunk * per_pixel


def safe_chunk(
    requested: int,
    observations: int,
    worker_memory: int | None,
    threads: int = 1,
    s2cloudless: bool = False,
) -> int:
    """The largest chunk up to ``requested`` whose tasks fit in half the worker's memory.

    The other half is headroom for the load tasks of the next blocks, GDAL's cache and
    the worker itself. Never below 128 px (tiny blocks would drown in overhead).
    """
    if not worker_memory:
        return requested
    budget = worker_memory // 2 // max(1, threads)
    chunk = requested
    while chunk > 128 and task_bytes(chunk, observations, s2cloudless) > budget:
        chunk //= 2
    return max(chunk, 128) if requested >= 128 else requested


def _cluster_memory(client: Client) -> tuple[int | None, int]:
    workers = client.scheduler_info().get("workers", {}).values()
    limits = [int(w.get("memory_limit") or 0) for w in workers]
    threads = [int(w.get("nthreads") or 1) for w in workers]
    positive = [m for m in limits if m > 0]
    return (min(positive) if positive else None), (max(threads) if threads else 1)


# --------------------------------------------------------------------------- write


def _blocks(arr: dask.array.Array) -> list[tuple[rasterio.windows.Window, Any]]:
    delayed = arr.to_delayed()
    out = []
    y0 = 0
    for iy, h in enumerate(arr.chunks[1]):
        x0 = 0
        for ix, w in enumerate(arr.chunks[2]):
            out.append((rasterio.windows.Window(x0, y0, w, h), delayed[0, iy, ix]))
            x0 += w
        y0 += h
    return out


def compute_blocks(
    arr: dask.array.Array, client: Client | None = None, in_flight: int | None = None
) -> Iterator[tuple[rasterio.windows.Window, npt.NDArray[np.float32]]]:
    """Yield (window, block) as blocks finish, keeping a bounded number in flight."""
    import dask

    blocks = _blocks(arr)
    if client is None:
        n = in_flight or (os.cpu_count() or 2)
        for i in range(0, len(blocks), n):
            batch = blocks[i : i + n]
            results = dask.compute(*[d for _, d in batch], scheduler="threads")
            for (win, _), block in zip(batch, results, strict=True):
                yield win, block
        return

    from pipelines.tiling import as_finished

    for (win, _), block in as_finished(client, blocks, lambda b: client.compute(b[1]), in_flight):
        yield win, block


@dataclass
class _Stats:
    aoi_pixels: int = 0
    valid_pixels: int = 0
    histogram: dict[int, int] = field(default_factory=dict)
    band_sums: dict[str, float] = field(default_factory=dict)
    band_counts: dict[str, int] = field(default_factory=dict)

    def add(self, block: npt.NDArray[np.float32], inside: npt.NDArray[np.bool_]) -> None:
        count = block[len(REFLECTANCE_BANDS)][inside]
        self.aoi_pixels += int(inside.sum())
        self.valid_pixels += int((count > 0).sum())
        values, freq = np.unique(count.astype(np.int64), return_counts=True)
        for v, f in zip(values.tolist(), freq.tolist(), strict=True):
            self.histogram[v] = self.histogram.get(v, 0) + f
        for i, name in enumerate(OUTPUT_BANDS):
            if name == COUNT_BAND:
                continue
            vals = block[i][inside]
            vals = vals[np.isfinite(vals)]
            self.band_sums[name] = self.band_sums.get(name, 0.0) + float(vals.sum())
            self.band_counts[name] = self.band_counts.get(name, 0) + int(vals.size)

    def count_stats(self) -> dict[str, float]:
        if not self.histogram:
            return {"min": 0, "max": 0, "mean": 0.0, "median": 0.0}
        keys = sorted(self.histogram)
        total = sum(self.histogram.values())
        mean = sum(k * f for k, f in self.histogram.items()) / total
        acc, median = 0, keys[0]
        for k in keys:
            acc += self.histogram[k]
            if acc * 2 >= total:
                median = k
                break
        return {"min": keys[0], "max": keys[-1], "mean": round(mean, 3), "median": median}

    def means(self) -> dict[str, float]:
        return {
            k: round(self.band_sums[k] / self.band_counts[k], 5)
            for k in self.band_sums
            if self.band_counts.get(k)
        }


def write_composite(
    blocks: Iterator[tuple[rasterio.windows.Window, npt.NDArray[np.float32]]],
    geobox: GeoBox,
    target: Path,
    *,
    n_blocks: int,
    aoi: Mapping[str, Any] | None,
    tags: Mapping[str, str],
    progress: Callable[[str], None] = log.info,
) -> _Stats:
    """Stream blocks into a tiled GTiff, then copy it to a COG with overviews, atomically."""
    stats = _Stats()
    h, w = geobox.shape.yx
    profile = {
        "width": w, "height": h, "count": len(OUTPUT_BANDS), "dtype": "float32",
        "crs": str(geobox.crs), "transform": geobox.affine, "nodata": float("nan"),
        "predictor": 3,
    }  # fmt: skip
    # Blocks arrive in any order, which the COG layout cannot take: staged_cog stages a
    # tiled GTiff beside the target, writes its overviews block by block, then GDAL's COG
    # driver lays them out.
    with staged_cog(target, profile, progress=progress) as dst:
        for i, name in enumerate(OUTPUT_BANDS, start=1):
            dst.set_band_description(i, name)
            dst.update_tags(i, description=BAND_DESCRIPTIONS[name])
        report = Progress("composite", n_blocks, progress, unit="blocks written")
        for done, (win, block) in enumerate(blocks, start=1):
            dst.write(block, window=win)
            inside = (
                aoi_mask(aoi, geobox, win)
                if aoi is not None
                else np.ones(block.shape[1:], dtype=bool)
            )
            stats.add(block, inside)
            report(done)
        dst.update_tags(**tags)
    return stats


def _empty_blocks(
    geobox: GeoBox, chunk: int
) -> Iterator[tuple[rasterio.windows.Window, npt.NDArray[np.float32]]]:
    h, w = geobox.shape.yx
    for y0 in range(0, h, chunk):
        for x0 in range(0, w, chunk):
            bh, bw = min(chunk, h - y0), min(chunk, w - x0)
            block = np.full((len(OUTPUT_BANDS), bh, bw), np.nan, dtype=np.float32)
            block[len(REFLECTANCE_BANDS)] = 0
            yield rasterio.windows.Window(x0, y0, bw, bh), block


class _ReadFailures(logging.Handler):
    """Collects odc-loader's 'Ignoring read failure reading <uri>' warnings."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = redact(record.getMessage())
        if "read failure" in msg and msg not in self.messages:
            self.messages.append(msg)


def build_composite(
    items: Sequence[Mapping[str, Any]],
    geobox: GeoBox,
    target: Path,
    *,
    region: str = "",
    period: str = "",
    aoi: Mapping[str, Any] | None = None,
    client: Client | None = None,
    chunk: int = DEFAULT_CHUNK,
    resampling: str = "bilinear",
    sign: Callable[[str], str] | None = None,
    cloud_mask: str = "scl",
    progress: Callable[[str], None] = log.info,
) -> CompositeResult:
    """Composite ``items`` on ``geobox`` into a COG at ``target``: the whole stage.

    ``sign`` rewrites each asset href just before reading (Planetary Computer's SAS
    tokens); the items passed in are not modified. ``cloud_mask="scl+s2cloudless"``
    also masks what s2cloudless finds on each scene's L1C twin (where it has one).
    """
    if chunk < 64:
        raise CompositeError(f"chunk must be at least 64 pixels, got {chunk}")
    if cloud_mask not in CLOUD_MASKS:
        raise CompositeError(f"unknown cloud_mask {cloud_mask!r}: use one of {CLOUD_MASKS}")
    started = time.perf_counter()
    if sign is not None:
        items = [signed_item(item, sign) for item in items]
    ok, skipped = check_scene_files(items)
    for s in skipped:
        progress(f"composite: skipping scene {s.id}: {s.reason}")
    s2c = cloud_mask == "scl+s2cloudless"
    l1c_notes: list[str] = []
    if s2c:
        ok, l1c_notes = _check_l1c(ok)
        for note in l1c_notes:
            progress(f"composite: {note}")
        with_twin = sum(1 for i in ok if L1C_ROLES[0] in i["assets"])
        progress(f"composite: s2cloudless on the L1C twins of {with_twin} of {len(ok)} scenes")
        if ok and not with_twin:
            s2c = False
    lon = geobox.extent.to_crs("EPSG:4326").centroid.coords[0][0]
    tagged, observations = plan_observations(ok, lon)
    n_ch = math.ceil(geobox.shape.y / chunk) * math.ceil(geobox.shape.x / chunk)
    failures = _ReadFailures()
    empty = not observations
    tags = {
        "asmwatch_region": region,
        "asmwatch_period": period,
        "asmwatch_scenes": ",".join(str(i["id"]) for i in ok),
        "asmwatch_skipped": ",".join(s.id for s in skipped),
        "asmwatch_empty": str(empty).lower(),
        "asmwatch_masked_scl": ",".join(map(str, MASKED_SCL)),
        "asmwatch_cloud_mask": "scl+s2cloudless" if s2c else "scl",
    }
    if empty:
        progress(
            f"composite: no usable scenes for {region or 'the AOI'} {period}; "
            "writing an empty (all-nodata) composite"
        )
        stats = write_composite(
            _empty_blocks(geobox, chunk), geobox, target,
            n_blocks=n_ch, aoi=aoi, tags=tags, progress=progress,
        )  # fmt: skip
    else:
        if client is not None:
            memory, threads = _cluster_memory(client)
            fitted = safe_chunk(chunk, len(observations), memory, threads, s2c)
            if fitted != chunk:
                progress(
                    f"composite: chunk {chunk} px would need about "
                    f"{task_bytes(chunk, len(observations), s2c) / 2**30:.1f} GiB per task with "
                    f"{len(observations)} observations; using {fitted} px to stay within "
                    f"the workers' {memory / 2**30 if memory else 0:.1f} GiB"
                )
                chunk = fitted
                n_ch = math.ceil(geobox.shape.y / chunk) * math.ceil(geobox.shape.x / chunk)
        progress(
            f"composite: {len(ok)} scenes in {len(observations)} observations onto "
            f"{geobox.shape.x}x{geobox.shape.y} px ({geobox.crs}, {geobox.resolution.x:g} m), "
            f"{n_ch} blocks of {chunk} px"
        )
        ds = load_stack(tagged, geobox, chunk=chunk, resampling=resampling, s2cloudless=s2c)
        arr = composite_array(ds, observations, s2cloudless=s2c)
        odc_log = logging.getLogger("odc.loader")
        odc_log.addHandler(failures)
        try:
            if client is not None:
                client.forward_logging("odc.loader", level=logging.WARNING)
            stats = write_composite(
                compute_blocks(arr, client), geobox, target,
                n_blocks=n_ch, aoi=aoi, tags=tags, progress=progress,
            )  # fmt: skip
        finally:
            odc_log.removeHandler(failures)
        for msg in failures.messages:
            progress(f"composite: {msg}")
    return CompositeResult(
        path=target,
        region=region,
        period=period,
        epsg=int(geobox.crs.epsg or 0) if geobox.crs is not None else 0,
        shape=(geobox.shape.y, geobox.shape.x),
        resolution=float(geobox.resolution.x),
        scenes_used=[str(i["id"]) for i in ok],
        skipped=skipped,
        observations=len(observations),
        valid_fraction=stats.valid_pixels / stats.aoi_pixels if stats.aoi_pixels else 0.0,
        clear_count_stats=stats.count_stats(),
        clear_count_histogram=dict(sorted(stats.histogram.items())),
        band_means=stats.means(),
        size_bytes=target.stat().st_size,
        seconds=time.perf_counter() - started,
        empty=empty,
        read_failures=list(failures.messages),
        cloud_mask="scl+s2cloudless" if s2c else "scl",
        l1c_scenes=sum(1 for i in ok if L1C_ROLES[0] in i["assets"]) if s2c else 0,
        l1c_notes=l1c_notes,
    )


def composite_for_region(
    region: Region,
    period: Period,
    root: Path,
    *,
    client: Client | None = None,
    chunk: int = DEFAULT_CHUNK,
    resolution: float = DEFAULT_RESOLUTION,
    progress: Callable[[str], None] = log.info,
    pc_subscription_key: str | None = None,
) -> CompositeResult:
    """Composite a region's stored scenes for one period (no scenes file: empty).

    ``pc_subscription_key``: Planetary Computer key for the SAS token API (default:
    ``$PC_SDK_SUBSCRIPTION_KEY``); never logged.
    """
    from pipelines.layout import scenes_path

    src = scenes_path(root, region.id, period.id)
    items = read_scene_items(src) if src.exists() else []
    if not src.exists():
        progress(f"composite: no scenes file {src} (the period has no scenes)")
    signer = signer_for(items, pc_subscription_key)
    if signer is not None:
        progress(f"composite: signing Azure Blob hrefs with tokens from {signer.token_url}")
    return build_composite(
        items,
        region_geobox(region, resolution),
        composite_path(root, region.id, period.id),
        region=region.id,
        period=period.id,
        aoi=region.geometry,
        client=client,
        chunk=chunk,
        sign=signer,
        cloud_mask=region.cloud_mask,
        progress=progress,
    )
