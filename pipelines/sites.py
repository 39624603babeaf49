"""The sites stage: mining probability -> cleaned mask -> ASM site polygons.

Fifth step of the flow (probability -> **sites** -> change -> risk). The probability COG
is thresholded at the threshold recorded with it (chosen on the model's validation
data; 0.5 for the index baseline), cleaned by a morphological opening (drops isolated
pixels) and closing (fills pinholes), and split into 8-connected components; those
below the minimum mapping unit (0.5 ha by default) are dropped. rasterio.features
polygonises each component; area is measured in the raster's UTM CRS, then geometries
are stored in EPSG:4326 GeoParquet with a bbox covering column.

``site_id`` is a digest of the region, the period and the polygon's vertices (rounded to
the centimetre in UTM), so re-running on the same raster gives the same ids.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.features
import shapely
import shapely.geometry
from scipy import ndimage

from pipelines.storage import atomic_path, partition_path

DEFAULT_MMU_HA = 0.5
COLUMNS = (
    "site_id", "region", "period", "area_ha", "mean_probability", "mapped_area_ha",
    "first_seen_period", "source", "geometry",
)  # fmt: skip


def sites_path(root: Path, region_id: str, period_id: str) -> Path:
    return partition_path(root, "sites", region_id, period_id, ".parquet")


def extract_sites(
    probability: Path,
    region_id: str,
    period_id: str,
    *,
    threshold: float | None = None,
    mmu_ha: float = DEFAULT_MMU_HA,
) -> Any:
    """Site polygons (a GeoDataFrame in EPSG:4326) from a probability COG."""
    import geopandas as gpd

    if mmu_ha < 0:
        raise ValueError(f"minimum mapping unit must be >= 0 ha, got {mmu_ha}")
    with rasterio.open(probability) as src:
        prob = src.read(1)
        transform, crs = src.transform, src.crs
        if threshold is None:
            threshold = float(src.tags().get("asmwatch_threshold", 0.5))
    if crs is None or not crs.is_projected:
        raise ValueError(f"probability raster {probability} must be in a projected (UTM) CRS")
    mask = np.nan_to_num(prob, nan=0.0) >= threshold
    structure = np.ones((3, 3), bool)
    mask = ndimage.binary_closing(ndimage.binary_opening(mask, structure), structure)
    labels, n = ndimage.label(mask, structure=structure)
    px_ha = abs(transform.a * transform.e) / 10_000
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = np.flatnonzero(sizes * px_ha >= mmu_ha)
    keep = keep[keep > 0]
    kept = np.where(np.isin(labels, keep), labels, 0).astype(np.int32)
    means = ndimage.mean(np.nan_to_num(prob, nan=0.0), kept, keep) if len(keep) else []
    mean_of = dict(zip(keep.tolist(), np.atleast_1d(means).tolist(), strict=True))
    parts: dict[int, list[shapely.Geometry]] = {}
    for geom, value in rasterio.features.shapes(
        kept, mask=kept > 0, transform=transform, connectivity=8
    ):
        parts.setdefault(int(value), []).append(shapely.geometry.shape(geom))
    rows = []
    for value in sorted(parts):
        geom = shapely.make_valid(shapely.union_all(parts[value]))
        rounded = shapely.set_precision(geom, 0.01)
        digest = hashlib.sha1(f"{region_id}|{period_id}|".encode() + shapely.to_wkb(rounded))
        rows.append(
            {
                "site_id": f"{region_id}-{period_id}-{digest.hexdigest()[:12]}",
                "region": region_id,
                "period": period_id,
                "area_ha": round(geom.area / 10_000, 4),
                "mean_probability": round(float(mean_of[value]), 4),
                "mapped_area_ha": np.nan,  # imported detections only
                "first_seen_period": None,  # imported "new" layers only; see asm_change
                "source": "model",
                "geometry": geom,
            }
        )
    frame = gpd.GeoDataFrame(rows, columns=list(COLUMNS), geometry="geometry", crs=crs)
    return conform(frame.sort_values("site_id").reset_index(drop=True).to_crs(4326))


def conform(frame: Any) -> Any:
    """Column types every sites file shares, whatever produced it (also when empty)."""
    for col in ("area_ha", "mean_probability", "mapped_area_ha"):
        frame[col] = frame[col].astype("float64")
    for col in ("site_id", "region", "period", "first_seen_period", "source"):
        frame[col] = frame[col].astype("string")
    return frame


def write_sites(frame: Any, target: Path) -> Path:
    """GeoParquet (EPSG:4326, bbox covering column), written atomically; empty is valid."""
    with atomic_path(target) as tmp:
        frame.to_parquet(tmp, write_covering_bbox=True, index=False)
    return target
