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
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import rasterio
import rasterio.features
import shapely
import shapely.affinity
import shapely.geometry
from affine import Affine
from scipy import ndimage

from pipelines.infra.errors import MissingInputError
from pipelines.infra.geotable import READ_ROWS, RowSpill, recorded, write_sorted
from pipelines.infra.layout import probability_path, sites_path
from pipelines.infra.progress import Progress
from pipelines.infra.storage import atomic_path
from pipelines.infra.tiling import (
    DEFAULT_TILE,
    Tile,
    Tiling,
    check_tile_size,
    read_window,
    resolve_client,
    run_tiles,
)
from pipelines.thresholds import MMU_HA

if TYPE_CHECKING:
    from distributed import Client

    from pipelines.regions import Region

DEFAULT_MMU_HA = MMU_HA
#: The key of a sites file's metadata that records the minimum mapping unit it was made
#: with (hectares; absent from imported sites, which keep the provider's polygons).
MMU_KEY = "asmwatch:mmu_ha"
COLUMNS = (
    "site_id", "region", "period", "area_ha", "mean_probability", "mapped_area_ha",
    "first_seen_period", "source", "geometry",
)  # fmt: skip


SITES_HALO = 8  # px of context per tile: the opening and closing reach 4 px
STRUCTURE = np.ones((3, 3), bool)  # 8-connectivity, for the clean-up and the components


@dataclass(frozen=True)
class SitesJob:
    probability: str
    height: int
    width: int
    threshold: float


@dataclass
class Component:
    """A connected component of the cleaned mask, in pixel coordinates (x col, y row)."""

    parts: list[shapely.Geometry]
    pixels: int
    prob_sum: float


@dataclass
class TileSites:
    """A tile's components: whole ones, and those that reach an inner edge of the tile
    (``seam``, by label) with the labels along the core's four edges to join them."""

    whole: list[Component]
    seam: dict[int, Component]
    edges: dict[str, npt.NDArray[np.int32]]  # "top", "bottom", "left", "right"


def sites_tile(tile: Tile, job: SitesJob) -> TileSites:
    """Threshold, clean-up, components and their polygons over one tile's core."""
    with rasterio.open(job.probability) as src:
        prob = read_window(src, 1, tile.read, job.probability)
    mask = np.nan_to_num(prob, nan=0.0) >= job.threshold
    # Same operations as on the whole raster: within the halo they differ at most 4 px
    # from the buffer's inner edges, never in the core; the raster's own edge is the
    # buffer's edge there, as on the whole raster.
    mask = ndimage.binary_closing(ndimage.binary_opening(mask, STRUCTURE), STRUCTURE)
    rows, cols = tile.core.within(tile.read)
    mask, prob = mask[rows, cols], np.nan_to_num(prob[rows, cols], nan=0.0)
    labels, n = ndimage.label(mask, structure=STRUCTURE)
    edges = {
        "top": labels[0], "bottom": labels[-1], "left": labels[:, 0], "right": labels[:, -1],
    }  # fmt: skip
    if n == 0:
        return TileSites([], {}, edges)
    pixels = np.bincount(labels.ravel(), minlength=n + 1)
    sums = np.bincount(labels.ravel(), weights=prob.ravel().astype(np.float64), minlength=n + 1)
    core = tile.core
    inner = {
        "top": core.row0 > 0, "bottom": core.row1 < job.height,
        "left": core.col0 > 0, "right": core.col1 < job.width,
    }  # fmt: skip
    seam_labels: set[int] = set()
    for side, strip in edges.items():
        if inner[side]:
            seam_labels.update(int(v) for v in np.unique(strip) if v)
    parts: dict[int, list[shapely.Geometry]] = {}
    pixel_space = Affine.translation(core.col0, core.row0)  # exact integer corners
    for geom, value in rasterio.features.shapes(
        labels.astype(np.int32), mask=labels > 0, transform=pixel_space, connectivity=8
    ):
        parts.setdefault(int(value), []).append(shapely.geometry.shape(geom))
    whole, seam = [], {}
    for value in sorted(parts):
        comp = Component(parts[value], int(pixels[value]), float(sums[value]))
        if value in seam_labels:
            seam[value] = comp
        else:
            whole.append(comp)
    return TileSites(whole, seam, edges)


def _joins(a: npt.NDArray[np.int32], b: npt.NDArray[np.int32]) -> set[tuple[int, int]]:
    """Label pairs of two facing edge strips that are 8-connected across the seam."""
    pairs: set[tuple[int, int]] = set()
    for shift in (-1, 0, 1):
        lo, hi = max(0, shift), len(a) + min(0, shift)
        x, y = a[lo:hi], b[lo - shift : hi - shift]
        both = (x > 0) & (y > 0)
        pairs.update(zip(x[both].tolist(), y[both].tolist(), strict=True))
    return pairs


def merge_seams(tiling: Tiling, results: dict[tuple[int, int], TileSites]) -> list[Component]:
    """Join the components that continue across tile edges (8-connectivity)."""
    parent: dict[tuple[int, int, int], tuple[int, int, int]] = {}

    def find(k: tuple[int, int, int]) -> tuple[int, int, int]:
        while parent.setdefault(k, k) != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    def union(a: tuple[int, int, int], b: tuple[int, int, int]) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    for (r, c), res in results.items():
        for label in res.seam:
            find((r, c, label))
        if (r, c + 1) in results:
            for la, lb in _joins(res.edges["right"], results[(r, c + 1)].edges["left"]):
                union((r, c, la), (r, c + 1, lb))
        if (r + 1, c) in results:
            for la, lb in _joins(res.edges["bottom"], results[(r + 1, c)].edges["top"]):
                union((r, c, la), (r + 1, c, lb))
        corners = (
            ((r + 1, c + 1), res.edges["bottom"][-1], "top", 0),
            ((r + 1, c - 1), res.edges["bottom"][0], "top", -1),
        )
        for other, mine, side, at in corners:
            if other in results and mine and (theirs := results[other].edges[side][at]):
                union((r, c, int(mine)), (other[0], other[1], int(theirs)))
    groups: dict[tuple[int, int, int], Component] = {}
    for key in sorted(parent):
        root = find(key)
        comp = results[key[:2]].seam[key[2]]
        if root not in groups:
            groups[root] = Component([], 0, 0.0)
        g = groups[root]
        g.parts.extend(comp.parts)
        g.pixels += comp.pixels
        g.prob_sum += comp.prob_sum
    return list(groups.values())


def canonical(parts: list[shapely.Geometry]) -> shapely.Geometry:
    """One geometry for a component, the same however its pixels were split into parts:
    the union, without collinear vertices, in normal form (pixel coordinates are exact)."""
    geom = shapely.union_all([shapely.make_valid(p) for p in parts])
    return shapely.normalize(shapely.simplify(geom, 0))


@dataclass
class SitesTable:
    """What ``sites_table`` wrote: the GeoParquet and its number of sites."""

    path: Path
    count: int


def sites_table(
    probability: Path,
    region_id: str,
    period_id: str,
    target: Path,
    *,
    threshold: float | None = None,
    mmu_ha: float = DEFAULT_MMU_HA,
    tile_px: int = DEFAULT_TILE,
    client: Client | Callable[[], Client] | None = None,
    progress: Callable[[str], None] | None = None,
) -> SitesTable:
    """Site polygons from a probability COG, written to ``target`` (GeoParquet in
    EPSG:4326, sorted by ``site_id``, atomically).

    Tile by tile (``tile_px``, with a ``SITES_HALO`` px halo; dask tasks on ``client``):
    the table is the same for any tile size, components that cross tile edges joined.
    No table is held whole: the sites of finished tiles are spilled as they come (only
    the components on tile seams wait for their neighbours), then sorted into ``target``
    (``geotable.write_sorted``).
    """
    import pyarrow as pa

    if mmu_ha < 0:
        raise ValueError(f"minimum mapping unit must be >= 0 ha, got {mmu_ha}")
    with rasterio.open(probability) as src:
        transform, crs, height, width = src.transform, src.crs, src.height, src.width
        tags = src.tags()
        if threshold is None:
            threshold = float(tags.get("asmwatch_threshold", 0.5))
    # A screening detector's blocks (ml.chips) are not outlines of mined land.
    source = "screening" if tags.get("asmwatch_screening") == "true" else "model"
    if crs is None or not crs.is_projected:
        raise ValueError(f"probability raster {probability} must be in a projected (UTM) CRS")
    tiling = Tiling(height, width, check_tile_size(tile_px or DEFAULT_TILE), halo=SITES_HALO)
    job = SitesJob(str(probability), height, width, threshold)
    say = progress or (lambda _m: None)
    cluster = resolve_client(client, tiling.n_tiles)
    where = "in this process" if cluster is None else "as dask tasks"
    say(f"asm_sites: {tiling.describe()}, {where}")
    report = Progress("asm_sites", tiling.n_tiles, say, unit="tiles done")
    rows = _SiteRows(region_id, period_id, transform, crs, mmu_ha, source)
    target.parent.mkdir(parents=True, exist_ok=True)
    kind = {"geometry": pa.binary(), "area_ha": pa.float64(), "mean_probability": pa.float64(), "mapped_area_ha": pa.float64()}  # fmt: skip
    schema = pa.schema([(c, kind.get(c, pa.string())) for c in COLUMNS])
    with tempfile.TemporaryDirectory(prefix=".sites-", dir=target.parent) as scratch:
        spill = RowSpill(Path(scratch) / "rows.parquet", schema)
        results: dict[tuple[int, int], TileSites] = {}
        pending: list[Component] = []
        for done, (tile, res) in enumerate(
            run_tiles(sites_tile, tiling.tiles(), job, client=cluster, name="sites"), start=1
        ):
            pending.extend(res.whole)
            res.whole = []
            results[(tile.row, tile.col)] = res
            if len(pending) >= READ_ROWS:
                spill.write(rows.of(pending))
                pending = []
            report(done)
        pending.extend(merge_seams(tiling, results))
        spill.write(rows.of(pending))
        write_sorted(
            spill, "site_id", target, lambda f: conform(f[list(COLUMNS)]), 4326,
            metadata={MMU_KEY: repr(float(mmu_ha))},
        )  # fmt: skip
    return SitesTable(target, spill.rows)


def recorded_mmu(path: Path) -> float | None:
    """The minimum mapping unit (ha) a sites file was made with, as it records it; None
    for files that record none (imported sites, files from before it was recorded)."""
    return recorded(path, [MMU_KEY]).get(MMU_KEY)


@dataclass
class _SiteRows:
    """Components to site rows: the minimum mapping unit, the geometry on the map grid
    and in EPSG:4326, the id, the area and the mean probability."""

    region_id: str
    period_id: str
    transform: Any
    crs: Any
    mmu_ha: float
    source: str = "model"  # or "screening": blocks of a chip classifier

    def of(self, components: list[Component]) -> dict[str, Any]:
        import geopandas as gpd

        t = self.transform
        px_ha = abs(t.a * t.e) / 10_000
        world = [t.a, t.b, t.d, t.e, t.c, t.f]
        out: dict[str, list[Any]] = {c: [] for c in COLUMNS}
        for comp in components:
            if comp.pixels * px_ha < self.mmu_ha:
                continue
            geom = shapely.affinity.affine_transform(canonical(comp.parts), world)
            rounded = shapely.set_precision(geom, 0.01)
            digest = hashlib.sha1(f"{self.region_id}|{self.period_id}|".encode() + shapely.to_wkb(rounded))  # fmt: skip
            out["site_id"].append(f"{self.region_id}-{self.period_id}-{digest.hexdigest()[:12]}")
            out["region"].append(self.region_id)
            out["period"].append(self.period_id)
            out["area_ha"].append(round(geom.area / 10_000, 4))
            out["mean_probability"].append(round(comp.prob_sum / comp.pixels, 4))
            out["mapped_area_ha"].append(np.nan)  # imported detections only
            out["first_seen_period"].append(None)  # imported "new" layers only; see asm_change
            out["source"].append(self.source)
            out["geometry"].append(geom)
        # as GeoDataFrame.to_crs draws them: the same transformer, geometry by geometry
        out["geometry"] = list(gpd.GeoSeries(out["geometry"], crs=self.crs).to_crs(4326))
        return out


def extract_sites(
    probability: Path,
    region_id: str,
    period_id: str,
    *,
    threshold: float | None = None,
    mmu_ha: float = DEFAULT_MMU_HA,
    tile_px: int = DEFAULT_TILE,
    client: Client | Callable[[], Client] | None = None,
    progress: Callable[[str], None] | None = None,
) -> Any:
    """``sites_table`` as a GeoDataFrame (EPSG:4326), through a scratch file."""
    import geopandas as gpd

    with tempfile.TemporaryDirectory(prefix="asmwatch-sites-") as scratch:
        table = sites_table(
            probability, region_id, period_id, Path(scratch) / "sites.parquet",
            threshold=threshold, mmu_ha=mmu_ha, tile_px=tile_px, client=client,
            progress=progress,
        )  # fmt: skip
        return gpd.read_parquet(table.path)


def conform(frame: Any) -> Any:
    """Column types every sites file shares, whatever produced it (also when empty)."""
    for col in ("area_ha", "mean_probability", "mapped_area_ha"):
        frame[col] = frame[col].astype("float64")
    for col in ("site_id", "region", "period", "first_seen_period", "source"):
        frame[col] = frame[col].astype("string")
    return frame


def write_sites(frame: Any, target: Path) -> Path:
    """GeoParquet (EPSG:4326, bbox covering column), written atomically; empty is valid.
    Row groups of ``ROW_GROUP_ROWS``: ``asm_change`` reads the file in chunks."""
    from pipelines.infra.geotable import ROW_GROUP_ROWS

    with atomic_path(target) as tmp:
        frame.to_parquet(tmp, write_covering_bbox=True, index=False, row_group_size=ROW_GROUP_ROWS)
    return target


@dataclass
class PeriodSites:
    """What ``sites_for_period`` wrote, and where the sites came from."""

    path: Path
    source: str  # "model", or "imported: <file>"
    notes: list[str]  # what the detections file's reader had to say
    mapped_area: bool  # the file gives the provider's own mined area


def sites_for_period(
    root: Path,
    region: Region,
    period_id: str,
    *,
    mmu_ha: float = DEFAULT_MMU_HA,
    tile_px: int = DEFAULT_TILE,
    client: Any = None,
    progress: Callable[[str], None] | None = None,
) -> PeriodSites:
    """The sites of one region's period, as GeoParquet at ``sites/<region>/<period>``:
    from the region's detections file when it has one, else from the probability
    raster (``MissingInputError`` when that is not there yet)."""
    target = sites_path(root, region.id, period_id)
    if region.detections is not None:  # the region's sites come from a file
        from pipelines.stages.imports import imported_sites, read_detections

        detections = read_detections(region.detections)
        write_sites(imported_sites(region, period_id, detections), target)
        return PeriodSites(
            target, f"imported: {region.detections.path}",
            [f"{detections.path.name}: {note}" for note in detections.notes],
            region.detections.mapped_area_field is not None,
        )  # fmt: skip
    src = probability_path(root, region.id, period_id)
    if not src.exists():
        raise MissingInputError(
            f"no probability raster at {src}: materialise `mining_probability` "
            f"for {region.id}/{period_id} first"
        )
    sites_table(
        src, region.id, period_id, target, mmu_ha=mmu_ha, tile_px=tile_px, client=client,
        progress=progress,
    )  # fmt: skip
    return PeriodSites(target, "model", [], False)
