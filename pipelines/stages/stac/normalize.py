"""Normalise Sentinel-2 L2A STAC items from any provider into one shape.

Second step of the flow (after the search). Providers disagree on nearly everything a
composite needs; this module absorbs the differences, learned from real responses:

* asset keys: Earth Search v1 and stactools use common names (``red``, ``nir``,
  ``swir16``, ``scl``; JPEG2000 twins end in ``-jp2``); Earth Search v0 and Planetary
  Computer use band ids (``B04``, ``B08``, ``B11``, ``SCL``).
* scale and offset: Earth Search v1 and stactools give ``raster:bands`` per asset
  (scale 1e-4, offset -0.1 from processing baseline 04.00 on). Planetary Computer and
  Earth Search v0 give none, so the rule is 1e-4 and an offset of -0.1 for baseline
  04.00 and later (ESA's BOA_ADD_OFFSET of -1000 DN), except where Earth Search v0
  says ``sentinel:boa_offset_applied: true`` (it already removed the offset from the
  COGs, so the DN are on the old scale).
* processing baseline: ``s2:processing_baseline`` (ES v1, PC, stactools),
  ``sentinel:processing_baseline`` (ES v0 after 2022), else the ``_Nxxyy_`` field of
  the product id.
* MGRS tile: ``s2:mgrs_tile`` (PC), ``grid:code`` = ``MGRS-32TMT`` (ES v1, stactools),
  ``sentinel:utm_zone``/``latitude_band``/``grid_square`` (ES v0), else the item id.
* twins: Earth Search keeps every processing of a scene (``_0_`` baseline 02.14 beside
  ``_1_`` baseline 05.00), and ``sentinel-2-l2a`` beside ``sentinel-2-c1-l2a``. Twins
  share a tile and a sensing time; the one with the highest baseline is kept.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pystac.utils
import shapely.geometry

#: Canonical roles and the asset keys each provider uses for them.
ROLE_KEYS: dict[str, tuple[str, ...]] = {
    "blue": ("blue", "B02", "b02"),
    "green": ("green", "B03", "b03"),
    "red": ("red", "B04", "b04"),
    "nir": ("nir", "B08", "b08"),
    "swir16": ("swir16", "B11", "b11"),
    "swir22": ("swir22", "B12", "b12"),
    "scl": ("scl", "SCL"),
}
#: Sentinel-2 band id of each reflectance role.
ROLE_BANDS: dict[str, str] = {
    "blue": "B02", "green": "B03", "red": "B04", "nir": "B08",
    "swir16": "B11", "swir22": "B12", "scl": "SCL",
}  # fmt: skip
#: Native ground sampling distance of each role, metres.
ROLE_RESOLUTION: dict[str, int] = {
    "blue": 10, "green": 10, "red": 10, "nir": 10, "swir16": 20, "swir22": 20, "scl": 20,
}  # fmt: skip
REFLECTANCE_ROLES: tuple[str, ...] = ("blue", "green", "red", "nir", "swir16", "swir22")
REQUIRED_ROLES: tuple[str, ...] = (*REFLECTANCE_ROLES, "scl")

#: Scene classification (SCL) classes of Sen2Cor, as listed in real L2A items.
SCL_CLASSES: dict[int, str] = {
    0: "no_data",
    1: "saturated_or_defective",
    2: "dark_area_pixels",
    3: "cloud_shadows",
    4: "vegetation",
    5: "not_vegetated",
    6: "water",
    7: "unclassified",
    8: "cloud_medium_probability",
    9: "cloud_high_probability",
    10: "thin_cirrus",
    11: "snow",
}
DEFAULT_SCALE = 1e-4
BOA_OFFSET = -0.1  # ESA's BOA_ADD_OFFSET (-1000 DN) times the 1e-4 quantification
OFFSET_BASELINE = 4.0  # processing baseline from which the offset applies
TWIN_TOLERANCE = dt.timedelta(seconds=60)

L2A_COLLECTIONS = {
    "sentinel-2-l2a",
    "sentinel-2-c1-l2a",
    "sentinel-2-pre-c1-l2a",
    "sentinel-s2-l2a",
    "sentinel-s2-l2a-cogs",
}

_TILE_IN_ID = re.compile(r"_T?(\d{2}[C-X][A-Z]{2})_")
_BASELINE_IN_ID = re.compile(r"_N(\d{2})(\d{2})_")
_SEQUENCE_IN_ID = re.compile(r"_(\d+)_L2A$")


@dataclass(frozen=True)
class SceneAsset:
    role: str
    href: str
    scale: float
    offset: float
    nodata: float | None
    resolution: float
    proj_shape: tuple[int, int] | None = None
    proj_transform: tuple[float, ...] | None = None
    media_type: str | None = None


@dataclass(frozen=True)
class Scene:
    """One Sentinel-2 L2A acquisition, normalised."""

    id: str
    collection: str
    datetime: dt.datetime
    mgrs_tile: str
    epsg: int | None
    cloud_cover: float | None
    processing_baseline: str
    platform: str | None
    geometry: dict[str, Any]
    bbox: tuple[float, ...]
    assets: Mapping[str, SceneAsset]
    properties: Mapping[str, Any] = field(default_factory=dict)
    #: The matching L1C scene's top-of-atmosphere bands (band id -> asset), for
    #: s2cloudless; empty unless the region asks for it (``pipelines.stages.stac.l1c``).
    l1c_assets: Mapping[str, SceneAsset] = field(default_factory=dict)
    l1c_id: str | None = None
    #: The provider's links worth keeping (``self``, ``collection``, ``root``, ...), with
    #: absolute hrefs: where the scene came from, and the collection link a STAC item
    #: with a ``collection`` must have.
    links: tuple[Mapping[str, Any], ...] = ()

    @property
    def baseline_number(self) -> float:
        return _baseline_number(self.processing_baseline)

    def to_item(self, extra_properties: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """A STAC item (dict) in asmwatch's canonical shape: role keys, raster:bands."""
        props: dict[str, Any] = {
            "datetime": self.datetime.isoformat().replace("+00:00", "Z"),
            "platform": self.platform,
            "constellation": "sentinel-2",
            "eo:cloud_cover": self.cloud_cover,
            "s2:mgrs_tile": self.mgrs_tile,
            "s2:processing_baseline": self.processing_baseline,
            "proj:epsg": self.epsg,
            **(extra_properties or {}),
        }
        assets: dict[str, Any] = {}
        for role, a in self.assets.items():
            band: dict[str, Any] = {
                "scale": a.scale,
                "offset": a.offset,
                "spatial_resolution": a.resolution,
                "data_type": "uint8" if role == "scl" else "uint16",
            }
            if a.nodata is not None:
                band["nodata"] = a.nodata
            asset: dict[str, Any] = {
                "href": a.href,
                "type": a.media_type or "image/tiff; application=geotiff; profile=cloud-optimized",
                "roles": ["data"],
                "raster:bands": [band],
            }
            if role != "scl":
                asset["eo:bands"] = [{"name": ROLE_BANDS[role], "common_name": role}]
            if a.proj_shape is not None:
                asset["proj:shape"] = list(a.proj_shape)
            if a.proj_transform is not None:
                asset["proj:transform"] = list(a.proj_transform)
            assets[role] = asset
        for band_id, a in self.l1c_assets.items():
            l1c_band: dict[str, Any] = {
                "scale": a.scale, "offset": a.offset, "spatial_resolution": a.resolution,
                "data_type": "uint16", "nodata": a.nodata if a.nodata is not None else 0,
            }  # fmt: skip
            l1c: dict[str, Any] = {
                "href": a.href,
                "type": a.media_type or "image/tiff; application=geotiff",
                "roles": ["data", "toa-reflectance"],
                "raster:bands": [l1c_band],
                "eo:bands": [{"name": band_id}],
            }
            if a.proj_shape is not None:
                l1c["proj:shape"] = list(a.proj_shape)
            if a.proj_transform is not None:
                l1c["proj:transform"] = list(a.proj_transform)
            assets[f"l1c_{band_id}"] = l1c
        if self.l1c_id:
            props["asmwatch:l1c_id"] = self.l1c_id
        return {
            "type": "Feature",
            "stac_version": "1.0.0",
            "stac_extensions": [
                "https://stac-extensions.github.io/eo/v1.1.0/schema.json",
                "https://stac-extensions.github.io/projection/v1.1.0/schema.json",
                "https://stac-extensions.github.io/raster/v1.1.0/schema.json",
            ],
            "id": self.id,
            "collection": self.collection,
            "geometry": self.geometry,
            "bbox": list(self.bbox),
            "properties": props,
            "links": [dict(link) for link in self.links],
            "assets": assets,
        }


@dataclass
class NormalizeResult:
    scenes: list[Scene]
    dropped: list[tuple[str, str]]  # (item id, reason)

    @property
    def reasons(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for _, reason in self.dropped:
            key = reason.split(":")[0]
            out[key] = out.get(key, 0) + 1
        return out


class NormalizeError(ValueError):
    """An item that cannot be used; the message names the item and the problem."""


def _baseline_number(baseline: str) -> float:
    try:
        return float(baseline)
    except ValueError:
        return math.nan


def processing_baseline(item: Mapping[str, Any]) -> str | None:
    """The processing baseline as ``"NN.NN"``, from properties or the product id."""
    props = item.get("properties", {})
    for key in ("s2:processing_baseline", "sentinel:processing_baseline"):
        v = props.get(key)
        if v not in (None, ""):
            return _format_baseline(str(v))
    for key in ("s2:product_uri", "sentinel:product_id", "s2:granule_id", "s2:datatake_id"):
        v = props.get(key)
        if isinstance(v, str) and (m := _BASELINE_IN_ID.search(v + "_")):
            return f"{m.group(1)}.{m.group(2)}"
    if m := _BASELINE_IN_ID.search(str(item.get("id", "")) + "_"):
        return f"{m.group(1)}.{m.group(2)}"
    return None


def _format_baseline(v: str) -> str:
    try:
        return f"{float(v):05.2f}"
    except ValueError:
        return v


def mgrs_tile(item: Mapping[str, Any]) -> str | None:
    props = item.get("properties", {})
    if isinstance(props.get("s2:mgrs_tile"), str):
        return str(props["s2:mgrs_tile"]).upper()
    code = props.get("grid:code")
    if isinstance(code, str) and code.upper().startswith("MGRS-"):
        return code[5:].upper()
    for prefix in ("mgrs", "sentinel"):
        zone = props.get(f"{prefix}:utm_zone")
        band = props.get(f"{prefix}:latitude_band")
        square = props.get(f"{prefix}:grid_square")
        if zone is not None and band and square:
            return f"{int(zone):02d}{band}{square}".upper()
    if m := _TILE_IN_ID.search(str(item.get("id", "")) + "_"):
        return m.group(1)
    return None


def _is_l2a(item: Mapping[str, Any]) -> bool:
    props = item.get("properties", {})
    ptype = props.get("s2:product_type")
    if isinstance(ptype, str):
        return ptype.upper() == "S2MSI2A"
    coll = item.get("collection")
    if isinstance(coll, str) and coll:
        return coll in L2A_COLLECTIONS or ("l2a" in coll.lower() and "s2" in coll.lower())
    item_id = str(item.get("id", ""))
    return item_id.endswith("_L2A") or "MSIL2A" in item_id


def _find_asset(assets: Mapping[str, Any], role: str) -> tuple[str, Mapping[str, Any]] | None:
    for key in ROLE_KEYS[role]:
        if key in assets:
            return key, assets[key]
    if role == "scl":
        return None
    # Fall back to eo:bands common names, skipping JPEG2000 and resampled variants.
    for key, asset in assets.items():
        if key.endswith("-jp2") or re.search(r"_\d+m$", key):
            continue
        for band in asset.get("eo:bands") or []:
            if band.get("common_name") == role and band.get("name", "").upper() in (
                ROLE_BANDS[role],
                role.upper(),
                "",
            ):
                return key, asset
    return None


def scale_offset(
    asset: Mapping[str, Any], role: str, baseline: float, props: Mapping[str, Any]
) -> tuple[float, float]:
    """(scale, offset) turning DN into reflectance: ``reflectance = DN * scale + offset``."""
    if role == "scl":
        return 1.0, 0.0
    bands = asset.get("raster:bands")
    if isinstance(bands, list) and bands and isinstance(bands[0], Mapping):
        b = bands[0]
        if "scale" in b or "offset" in b:
            return float(b.get("scale", 1.0)), float(b.get("offset", 0.0))
    if props.get("sentinel:boa_offset_applied") is True:
        return DEFAULT_SCALE, 0.0
    if not math.isnan(baseline) and baseline >= OFFSET_BASELINE:
        return DEFAULT_SCALE, BOA_OFFSET
    return DEFAULT_SCALE, 0.0


def _nodata(asset: Mapping[str, Any]) -> float | None:
    bands = asset.get("raster:bands")
    if isinstance(bands, list) and bands and isinstance(bands[0], Mapping) and "nodata" in bands[0]:
        return float(bands[0]["nodata"])
    return 0.0  # Sentinel-2 L2A: DN 0 is NO_DATA in every band and in SCL


def _epsg(item: Mapping[str, Any], asset: Mapping[str, Any] | None = None) -> int | None:
    for src in (asset or {}, item.get("properties", {})):
        if src.get("proj:epsg") is not None:
            return int(src["proj:epsg"])
        code = src.get("proj:code")
        if isinstance(code, str) and code.upper().startswith("EPSG:"):
            return int(code.split(":")[1])
    return None


def _tile_epsg(item_id: str, tile: str, declared: int | None) -> int:
    """The scene's UTM EPSG code: as declared, checked against its MGRS tile.

    Sentinel-2 tiles are UTM by construction: zone = the tile's first digits, north for
    latitude bands N-X. Without projection information the code comes from the tile; a
    declared code that is not that zone's is refused (a wrong CRS would put every pixel
    in the wrong place).
    """
    m = re.match(r"^(\d{1,2})([C-HJ-NP-X])[A-Z]{2}$", tile.upper())
    if m is None:
        if declared is None:
            raise NormalizeError(f"{item_id}: no projection information (proj:epsg, proj:code) and no MGRS tile to derive it from")  # fmt: skip
        return declared
    zone, band = int(m.group(1)), m.group(2)
    expected = (32600 if band >= "N" else 32700) + zone
    if declared is None:
        return expected
    if declared != expected:
        raise NormalizeError(
            f"{item_id}: proj:epsg {declared} does not match MGRS tile {tile} (UTM zone "
            f"{zone}{'N' if band >= 'N' else 'S'}, EPSG:{expected}); the item's projection "
            "information is wrong"
        )
    return declared


def _resolution(asset: Mapping[str, Any], default: float) -> float:
    bands = asset.get("raster:bands")
    if isinstance(bands, list) and bands and isinstance(bands[0], Mapping):
        r = bands[0].get("spatial_resolution")
        if r:
            return float(r)
    gsd = asset.get("gsd")
    if gsd:
        return float(gsd)
    return float(default)


def scene_asset(
    a: Mapping[str, Any],
    role: str,
    baseline: float,
    props: Mapping[str, Any],
    default_resolution: float,
) -> SceneAsset:
    """One asset normalised: href, scale/offset, nodata, resolution and grid."""
    scale, offset = scale_offset(a, role, baseline, props)
    shape = a.get("proj:shape")
    transform = a.get("proj:transform")
    return SceneAsset(
        role=role,
        href=str(a["href"]),
        scale=scale,
        offset=offset,
        nodata=_nodata(a),
        resolution=_resolution(a, default_resolution),
        proj_shape=(int(shape[0]), int(shape[1])) if shape else None,
        proj_transform=tuple(float(v) for v in transform[:6]) if transform else None,
        media_type=a.get("type"),
    )


def normalize_item(item: Mapping[str, Any]) -> Scene:
    """Normalise one STAC item (dict); raise ``NormalizeError`` naming what is wrong."""
    item_id = item.get("id")
    if not isinstance(item_id, str) or not item_id:
        raise NormalizeError("item without an id")
    if not _is_l2a(item):
        raise NormalizeError(
            f"{item_id}: not a Sentinel-2 L2A item (collection {item.get('collection')})"
        )
    props = item.get("properties") or {}
    raw_dt = props.get("datetime") or props.get("start_datetime")
    if not raw_dt:
        raise NormalizeError(f"{item_id}: no datetime")
    try:
        when = pystac.utils.str_to_datetime(str(raw_dt)).astimezone(dt.UTC)
    except ValueError as e:
        raise NormalizeError(f"{item_id}: bad datetime {raw_dt!r}") from e
    tile = mgrs_tile(item)
    if tile is None:
        raise NormalizeError(f"{item_id}: no MGRS tile in properties or id")
    baseline = processing_baseline(item)
    if baseline is None:
        raise NormalizeError(f"{item_id}: no processing baseline in properties or product id")
    geometry = item.get("geometry")
    if not geometry:
        raise NormalizeError(f"{item_id}: no geometry")
    try:
        geom = shapely.geometry.shape(geometry)
    except Exception as e:
        raise NormalizeError(f"{item_id}: malformed geometry ({e})") from e
    if geom.is_empty:
        raise NormalizeError(f"{item_id}: empty geometry")
    bbox = tuple(float(v) for v in (item.get("bbox") or geom.bounds))

    raw_assets = item.get("assets") or {}
    assets: dict[str, SceneAsset] = {}
    raw_by_role: dict[str, Mapping[str, Any]] = {}
    missing = []
    bnum = _baseline_number(baseline)
    for role in REQUIRED_ROLES:
        found = _find_asset(raw_assets, role)
        if found is None:
            missing.append(role)
            continue
        _, a = found
        raw_by_role[role] = a
        assets[role] = scene_asset(a, role, bnum, props, ROLE_RESOLUTION[role])
    if missing:
        raise NormalizeError(f"{item_id}: missing assets for {', '.join(missing)}")
    cc = props.get("eo:cloud_cover")
    return Scene(
        id=item_id,
        collection=str(item.get("collection") or ""),
        datetime=when,
        mgrs_tile=tile,
        epsg=_tile_epsg(item_id, tile, _epsg(item, raw_by_role["red"])),
        cloud_cover=float(cc) if cc is not None else None,
        processing_baseline=baseline,
        platform=props.get("platform"),
        geometry=dict(geometry),
        bbox=bbox,
        assets=assets,
        properties=dict(props),
        links=kept_links(item),
    )


#: Link relations a normalised item keeps from its provider's.
KEPT_LINK_RELS = ("self", "canonical", "collection", "parent", "root", "license", "derived_from")


def kept_links(item: Mapping[str, Any]) -> tuple[dict[str, Any], ...]:
    """The item's links with a kept relation and an absolute http(s) href."""
    out = []
    for link in item.get("links") or []:
        if not isinstance(link, Mapping):
            continue
        href, rel = link.get("href"), link.get("rel")
        if rel in KEPT_LINK_RELS and isinstance(href, str) and href.startswith(("http://", "https://")):  # fmt: skip
            out.append({k: link[k] for k in ("rel", "href", "type", "title") if k in link})
    return tuple(out)


def _twin_rank(s: Scene) -> tuple[float, int, int, str]:
    b = s.baseline_number
    seq = 0
    if m := _SEQUENCE_IN_ID.search(s.id):
        seq = int(m.group(1))
    return (b if not math.isnan(b) else -1.0, int("c1" in s.collection), seq, s.id)


def drop_twins(scenes: Iterable[Scene]) -> tuple[list[Scene], list[tuple[str, str]]]:
    """Keep one scene per (MGRS tile, sensing time): the highest processing baseline.

    Ties go to Collection 1 (ESA's consistent reprocessing), then to the higher
    Earth Search sequence number. Returns (kept, [(dropped id, reason)]).
    """
    by_tile: dict[str, list[Scene]] = {}
    for s in scenes:
        by_tile.setdefault(s.mgrs_tile, []).append(s)
    kept: list[Scene] = []
    dropped: list[tuple[str, str]] = []
    for tile_scenes in by_tile.values():
        tile_scenes.sort(key=lambda s: s.datetime)
        group: list[Scene] = []
        for cand in [*tile_scenes, None]:
            if cand is not None and group and cand.datetime - group[0].datetime <= TWIN_TOLERANCE:
                group.append(cand)
                continue
            if group:
                best = max(group, key=_twin_rank)
                kept.append(best)
                dropped.extend(
                    (g.id, f"duplicate: twin of {best.id} (kept baseline "
                     f"{best.processing_baseline}, {best.collection or 'no collection'})")
                    for g in group if g is not best
                )  # fmt: skip
            group = [cand] if cand is not None else []
    kept.sort(key=lambda s: (s.datetime, s.mgrs_tile))
    return kept, dropped


def normalize_items(items: Iterable[Mapping[str, Any]]) -> NormalizeResult:
    """Normalise items, skip the unusable ones (with a reason) and drop twins."""
    scenes: list[Scene] = []
    dropped: list[tuple[str, str]] = []
    seen: set[str] = set()
    for item in items:
        item_id = str(item.get("id", "?"))
        if item_id in seen:
            dropped.append((item_id, "duplicate: same id returned twice"))
            continue
        seen.add(item_id)
        try:
            scenes.append(normalize_item(item))
        except NormalizeError as e:
            reason = str(e).removeprefix(f"{item_id}: ")
            dropped.append((item_id, f"unusable: {reason}"))
    kept, twins = drop_twins(scenes)
    return NormalizeResult(scenes=kept, dropped=dropped + twins)
