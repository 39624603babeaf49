"""L1C twins of L2A scenes, for the s2cloudless cloud mask.

s2cloudless (Sentinel Hub's LightGBM pixel classifier) was trained on Level-1C
top-of-atmosphere reflectance of ten bands: B01 B02 B04 B05 B08 B8A B09 B10 B11 B12.
L2A products drop B10 (cirrus, no surface signal), so the mask is computed on the L1C
product of the same acquisition. Earth Search v1 serves it as ``sentinel-2-l1c`` with
asset keys ``coastal blue red rededge1 nir nir08 nir09 cirrus swir16 swir22`` (JPEG2000
in the requester-pays bucket ``s3://sentinel-s2-l1c``; reading needs AWS credentials
and ``AWS_REQUEST_PAYER=requester``); Earth Search v0 used ``B01`` ... ``B12``. From
processing baseline 04.00 L1C carries ESA's RADIO_ADD_OFFSET of -1000 DN, so
``TOA = DN x 1e-4 - 0.1``, as ``raster:bands`` says when present. Planetary Computer has
no L1C collection.

An L2A scene and an L1C item are twins when they share the MGRS tile and the sensing
time to within a minute.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pipelines.stages.stac.normalize import (
    TWIN_TOLERANCE,
    NormalizeError,
    Scene,
    SceneAsset,
    _baseline_number,
    mgrs_tile,
    processing_baseline,
    scene_asset,
)

#: s2cloudless's input bands, in the order its model takes them.
S2CLOUDLESS_BANDS: tuple[str, ...] = (
    "B01", "B02", "B04", "B05", "B08", "B8A", "B09", "B10", "B11", "B12",
)  # fmt: skip
L1C_KEYS: dict[str, tuple[str, ...]] = {
    "B01": ("coastal", "B01"), "B02": ("blue", "B02"), "B04": ("red", "B04"),
    "B05": ("rededge1", "B05"), "B08": ("nir", "B08"), "B8A": ("nir08", "B8A"),
    "B09": ("nir09", "B09"), "B10": ("cirrus", "B10"), "B11": ("swir16", "B11"),
    "B12": ("swir22", "B12"),
}  # fmt: skip
L1C_RESOLUTION: dict[str, int] = {
    "B01": 60, "B02": 10, "B04": 10, "B05": 20, "B08": 10, "B8A": 20, "B09": 60,
    "B10": 60, "B11": 20, "B12": 20,
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class L1CItem:
    id: str
    datetime: dt.datetime
    mgrs_tile: str
    assets: Mapping[str, SceneAsset]


def is_l1c(item: Mapping[str, Any]) -> bool:
    props = item.get("properties", {})
    ptype = props.get("s2:product_type")
    if isinstance(ptype, str):
        return ptype.upper() == "S2MSI1C"
    return str(item.get("id", "")).endswith("_L1C") or "l1c" in str(item.get("collection", ""))


def normalize_l1c_item(item: Mapping[str, Any]) -> L1CItem:
    """The ten s2cloudless bands of an L1C item; ``NormalizeError`` names what is missing."""
    item_id = str(item.get("id", ""))
    if not is_l1c(item):
        raise NormalizeError(f"{item_id}: not a Sentinel-2 L1C item")
    props = item.get("properties", {})
    tile = mgrs_tile(item)
    if tile is None:
        raise NormalizeError(f"{item_id}: no MGRS tile")
    when = dt.datetime.fromisoformat(str(props["datetime"]).replace("Z", "+00:00"))
    baseline = _baseline_number(processing_baseline(item) or "")
    raw_assets = item.get("assets", {})
    out: dict[str, SceneAsset] = {}
    missing = []
    for band, keys in L1C_KEYS.items():
        key = next((k for k in keys if k in raw_assets), None)
        if key is None:
            missing.append(band)
            continue
        # The L2A rules hold for L1C too: raster:bands, else -0.1 from baseline 04.00
        # (there called RADIO_ADD_OFFSET).
        out[band] = scene_asset(raw_assets[key], band, baseline, props, L1C_RESOLUTION[band])
    if missing:
        raise NormalizeError(f"{item_id}: no asset for {', '.join(missing)}")
    return L1CItem(id=item_id, datetime=when, mgrs_tile=tile, assets=out)


@dataclasses.dataclass
class PairResult:
    scenes: list[Scene]  # every input scene, with l1c_assets where a twin was found
    unmatched: list[str]  # L2A scene ids without an L1C twin
    skipped: list[tuple[str, str]]  # (L1C item id, why it was unusable)


def pair_l1c(scenes: Sequence[Scene], l1c_items: Iterable[Mapping[str, Any]]) -> PairResult:
    """Attach to each L2A scene the L1C twin of the same tile and sensing time."""
    candidates: list[L1CItem] = []
    skipped: list[tuple[str, str]] = []
    for raw in l1c_items:
        if not is_l1c(raw):
            continue  # a server that ignores `collections` (the embedded one) mixes in L2A
        try:
            candidates.append(normalize_l1c_item(raw))
        except (NormalizeError, KeyError, ValueError) as e:
            skipped.append((str(raw.get("id")), str(e)))
    out: list[Scene] = []
    unmatched: list[str] = []
    for sc in scenes:
        twins = [
            c
            for c in candidates
            if c.mgrs_tile == sc.mgrs_tile and abs(c.datetime - sc.datetime) <= TWIN_TOLERANCE
        ]
        if not twins:
            unmatched.append(sc.id)
            out.append(sc)
            continue
        best = min(twins, key=lambda c: abs(c.datetime - sc.datetime))
        out.append(dataclasses.replace(sc, l1c_assets=dict(best.assets), l1c_id=best.id))
    return PairResult(scenes=out, unmatched=unmatched, skipped=skipped)
