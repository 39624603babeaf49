"""The change stage: ASM sites of a period against the previous period of the same region.

Sixth step of the flow (probability -> sites -> **change** -> risk). In the region's UTM
zone, with ``prev`` the union of last period's sites and ``cur`` this period's:

- ``new``: a site of this period that touches no mining of the previous period;
- ``expanded``: the part of a site that grew beyond the previous mining it touches
  (site minus ``prev``);
- ``stable``: mining in both periods (site intersect ``prev``);
- ``abandoned`` and ``revegetating``: land mined in any earlier period that is not
  mined now (the footprint of all earlier mining minus ``cur``; the footprint travels
  forward as the previous period's change rows of every kind), split per connected part
  by this period's composite. A part whose mean median NDVI reached ``NDVI_RECOVERED``
  is re-vegetating, the rest is abandoned. These two are a state, not a transition: land
  abandoned in 2020 that greens up by 2022 is re-vegetating in 2022's rows. Without a
  composite (imported detections) every part is abandoned and the summary says
  re-vegetation was not assessed.

``first_seen_period``: this period for new and expanded areas. Stable, abandoned and
re-vegetating areas take the earliest first-seen period among the previous period's
change rows they overlap. When the previous period's change was not computed, they take
the previous period, a bound (the summary notes it). The first period of a region has no
previous one, so all of its mining is ``new``: the baseline.

Parts smaller than ``MIN_PART_HA`` (one 10 m pixel) are overlay slivers and are dropped;
abandoned and re-vegetating parts smaller than the minimum mapping unit
(``pipelines.thresholds.MMU_HA``) are edge jitter between two maps of a site, and are
dropped too (neither counted nor drawn).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import numpy.typing as npt
import rasterio
import rasterio.errors
import rasterio.features
import shapely
from pyproj import Transformer

from pipelines.infra.errors import MissingInputError
from pipelines.infra.geotable import (
    READ_ROWS,
    GeoTableError,
    RowSpill,
    rank_of,
    read_chunks,
    sort_rows,
    streamed,
    write_sorted,
)
from pipelines.infra.grid import bbox_utm_epsg
from pipelines.infra.layout import change_path, composite_path, sites_path, summary_path
from pipelines.infra.storage import atomic_path
from pipelines.infra.tiling import DEFAULT_TILE, Span, Tiling, gdal_cache, read_window
from pipelines.infra.vectors import polygonal_part
from pipelines.regions import Region, RegionsError, parse_period
from pipelines.thresholds import MMU_HA, NDVI_RECOVERED, number

KINDS = ("new", "expanded", "stable", "abandoned", "revegetating")
#: The notes of the summary (``notes``, joined by "; "), in English; the reports put each
#: into their language (``pipelines.stages.reports.note_text``).
NOTE_FIRST_PERIOD = "first period of the region: all its mining is new (the baseline)"
NOTE_NO_COMPOSITE = "no composite for this period: re-vegetation not assessed"
NOTE_NO_HISTORY = (
    "no asm_change for {period}: first_seen_period of older mining is a bound (that "
    "period), and land abandoned before it is not tracked"
)
NOTE_MMU_DIFFERS = (
    "the sites of {previous_period} were mapped with a minimum mapping unit of "
    "{previous} ha and this period's with {current} ha: former mining is counted from "
    "{used} ha, and sites between the two units can appear or vanish without changing"
)
# Mean composite NDVI at which formerly mined land counts as re-vegetating. Bare tailings,
# sediment and ponds stay below about 0.25 (the demo's spectra: 0.12); first-year
# regrowth reaches about 0.4, older regrowth 0.7; intact lowland forest is above 0.8.
# The value: pipelines.thresholds.NDVI_RECOVERED.
MIN_PART_HA = 0.01
NDVI_HALO = 256  # px: parts up to this size are cut from their tile's NDVI window
NDVI_CACHE_BYTES = 64 * 2**20  # GDAL's block cache while the NDVI means are read
#: Input geometries per batch of the overlay (``batch_ids``): the stage holds the
#: geometries of one batch at a time.
OVERLAY_BATCH = 1000
#: Batches sweep the region in bands of this many metres (an NDVI tile of 1024 px).
SWEEP_M = 10_240.0
#: Seconds between progress lines of the overlay.
PROGRESS_S = 10.0
COLUMNS = (
    "change_id", "region", "period", "kind", "area_ha", "first_seen_period", "site_id",
    "mean_ndvi", "geometry",
)  # fmt: skip


#: Summary columns that are DOUBLE in every file, null or not.
SUMMARY_FLOATS = (
    "mining_ha", *(f"{k}_ha" for k in KINDS), "previous_mining_ha", "growth_vs_previous",
    "first_mining_ha", "growth_vs_first",
)  # fmt: skip


@dataclass
class ChangeResult:
    frame: Any  # GeoDataFrame, EPSG:4326, COLUMNS
    summary: dict[str, Any]
    notes: list[str] = field(default_factory=list)


class NdviReader:
    """Mean composite NDVI over polygons, the composite opened once for every call.

    The composite is read tile by tile (``pipelines.infra.tiling``): each tile's NDVI window,
    with a halo, serves every part whose pixels lie inside it; a part larger than that
    is read on its own. The last ``CACHED_TILES`` windows are kept, so that calls for
    neighbouring areas (the change overlay's batches) do not read a tile again.
    """

    CACHED_TILES = 4

    def __init__(self, composite: Path, tile_px: int = DEFAULT_TILE) -> None:
        self.path = composite
        self.tile_px = tile_px
        # one GDAL environment for all reads; GDAL's block cache small (the tiles kept
        # here are the cache): left at its default (5 % of RAM), it grew with every tile
        # read, 0.8 GiB over 100,000 sites
        self._env = gdal_cache(NDVI_CACHE_BYTES)
        self._src: Any = None
        self._cache: OrderedDict[int, npt.NDArray[np.float32]] = OrderedDict()

    def __enter__(self) -> NdviReader:
        self._env.__enter__()
        self._src = rasterio.open(self.path)
        self.band = list(self._src.descriptions).index("NDVI") + 1
        self.tiling = Tiling(self._src.height, self._src.width, self.tile_px, halo=NDVI_HALO)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self._src.close()
        self._cache.clear()
        self._env.__exit__(kind, error, trace)

    def _tile(self, k: int) -> npt.NDArray[np.float32]:
        if k in self._cache:
            self._cache.move_to_end(k)
            return self._cache[k]
        tile = self.tiling.tile(k // self.tiling.cols, k % self.tiling.cols)
        buf: npt.NDArray[np.float32] = read_window(self._src, self.band, tile.read, self.path)
        self._cache[k] = buf
        if len(self._cache) > self.CACHED_TILES:
            self._cache.popitem(last=False)
        return buf

    def means(self, parts: Any, crs_of_parts: int) -> npt.NDArray[np.float64]:
        """Mean NDVI over each polygon of ``parts`` (all touched pixels); NaN where
        unobserved or outside the composite."""
        src, tile_px, tiling = self._src, self.tile_px, self.tiling
        out = np.full(len(parts), np.nan)
        if not len(parts):
            return out
        geoms = np.asarray(parts, dtype=object)
        if src.crs is not None and src.crs.to_epsg() != crs_of_parts:
            to_comp = Transformer.from_crs(crs_of_parts, src.crs, always_xy=True).transform
            geoms = np.asarray([shapely.transform(g, to_comp, interleaved=False) for g in geoms])
        inv = ~src.transform
        bounds = shapely.bounds(geoms)  # xmin, ymin, xmax, ymax
        c0, r0 = inv * (bounds[:, 0], bounds[:, 3])
        c1, r1 = inv * (bounds[:, 2], bounds[:, 1])
        # The window rasterio.features.geometry_window gives each part, clipped below.
        r0 = np.floor(np.asarray(r0)).astype(np.int64)
        c0 = np.floor(np.asarray(c0)).astype(np.int64)
        r1 = np.ceil(np.asarray(r1)).astype(np.int64)
        c1 = np.ceil(np.asarray(c1)).astype(np.int64)
        # clip to the raster; parts entirely outside stay NaN
        r0c, c0c = np.clip(r0, 0, src.height), np.clip(c0, 0, src.width)
        r1c, c1c = np.clip(r1, 0, src.height), np.clip(c1, 0, src.width)
        inside = (r1c > r0c) & (c1c > c0c)
        key = (r0c // tile_px) * tiling.cols + (c0c // tile_px)
        fits = inside & (r1c - r0c <= NDVI_HALO) & (c1c - c0c <= NDVI_HALO)
        for k in np.unique(key[fits]):
            tile = tiling.tile(int(k) // tiling.cols, int(k) % tiling.cols)
            idx = np.flatnonzero(fits & (key == k))
            buf = self._tile(int(k))
            finite = np.isfinite(buf)
            wt = src.window_transform(tile.read.window)
            spans = {int(i): Span(int(r0c[i]), int(r1c[i]), int(c0c[i]), int(c1c[i])) for i in idx}
            # Parts whose windows (grown by a pixel) do not meet burn in one pass each:
            # no pixel can be touched by two of them, so each reads as if burnt alone.
            for group in _apart(spans, tile.read):
                labels = rasterio.features.rasterize(
                    [(geoms[i], n + 1) for n, i in enumerate(group)], out_shape=buf.shape,
                    transform=wt, all_touched=True, fill=0, dtype="int32",
                )  # fmt: skip
                for n, i in enumerate(group):
                    rows, cols = spans[i].within(tile.read)
                    hit = (labels[rows, cols] == n + 1) & finite[rows, cols]
                    vals = buf[rows, cols][hit]
                    out[i] = float(vals.mean(dtype=np.float64)) if vals.size else np.nan
        for j in np.flatnonzero(inside & ~fits).tolist():  # large parts: a read each
            span = Span(int(r0c[j]), int(r1c[j]), int(c0c[j]), int(c1c[j]))
            data = read_window(src, self.band, span, self.path)
            out[j] = _mean_in(data, geoms[j], src.window_transform(span.window))
        return out


def ndvi_means(
    composite: Path, parts: Any, crs_of_parts: int, tile_px: int = DEFAULT_TILE
) -> npt.NDArray[np.float64]:
    """Mean composite NDVI over each polygon of ``parts`` (``NdviReader.means``)."""
    with NdviReader(composite, tile_px) as reader:
        return reader.means(parts, crs_of_parts)


def _apart(spans: dict[int, Span], within: Span) -> list[list[int]]:
    """Greedy groups of ``spans`` whose windows, grown by one pixel, do not overlap."""
    groups: list[tuple[npt.NDArray[np.bool_], list[int]]] = []
    h, w = within.shape
    for i, span in spans.items():
        r0, c0 = max(0, span.row0 - within.row0 - 1), max(0, span.col0 - within.col0 - 1)
        r1, c1 = min(h, span.row1 - within.row0 + 1), min(w, span.col1 - within.col0 + 1)
        free = next((g for g in groups if not g[0][r0:r1, c0:c1].any()), None)
        if free is None:
            free = (np.zeros((h, w), bool), [])
            groups.append(free)
        free[0][r0:r1, c0:c1] = True
        free[1].append(i)
    return [members for _, members in groups]


def _mean_in(data: npt.NDArray[np.float32], geom: shapely.Geometry, transform: Any) -> float:
    if data.size == 0:
        return float("nan")
    hit = rasterio.features.geometry_mask([geom], data.shape, transform, invert=True, all_touched=True)  # fmt: skip
    values = data[hit & np.isfinite(data)]
    return float(values.mean(dtype=np.float64)) if values.size else float("nan")


def _clean(geoms: Any, epsg: int) -> npt.NDArray[np.object_]:
    """``geoms`` (a GeoSeries) in UTM, valid, polygonal and snapped to 1 cm.

    Pixel-edge polygons that went to EPSG:4326 and back can touch themselves by a
    rounding error, which GEOS overlay refuses; snapping to a centimetre grid repairs
    that without moving anything by more than a centimetre.
    """
    out = shapely.set_precision(shapely.make_valid(geoms.to_crs(epsg).to_numpy()), 0.01)
    return np.asarray([polygonal_part(g) for g in out], dtype=object)


def _start(period_id: str) -> Any:
    try:
        return parse_period(period_id).start
    except RegionsError:  # a custom {id, start, end} period of another region: sort last
        return parse_period("2100").start


def _earliest(geoms: Any, shapes: Any, firsts: list[str], fallback: str) -> list[str]:
    """For each geometry, the earliest ``firsts`` (first-seen periods) of the history
    ``shapes`` it overlaps (by area; an STRtree finds the candidates), else ``fallback``."""
    out = [fallback] * len(geoms)
    if len(shapes) == 0 or len(geoms) == 0:
        return out
    tree = shapely.STRtree(shapes)
    gi, hi = tree.query(np.asarray(geoms, dtype=object), predicate="intersects")
    if len(gi) == 0:
        return out
    overlap = shapely.area(shapely.intersection(np.asarray(geoms, dtype=object)[gi], shapes[hi]))
    gi, hi = gi[overlap > 0], hi[overlap > 0]
    ordinal = {f: _start(f).toordinal() for f in set(firsts)}
    starts = np.asarray([ordinal[f] for f in firsts], dtype=np.int64)[hi]
    first = np.asarray(firsts, dtype=object)[hi]
    order = np.lexsort((first.astype(str), starts, gi))  # by geometry, earliest start, name
    gi, first = gi[order], first[order]
    first_of = np.flatnonzero(np.r_[True, gi[1:] != gi[:-1]])
    for g, f in zip(gi[first_of].tolist(), first[first_of].tolist(), strict=True):
        out[g] = f
    return out


def clusters(geoms: Any) -> list[npt.NDArray[np.intp]]:
    """Indices of ``geoms`` per cluster of geometries that intersect one another, directly
    or through others (an STRtree and connected components), clusters in order of their
    first member, each sorted."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    geoms = np.asarray(geoms, dtype=object)
    n = len(geoms)
    if n == 0:
        return []
    a, b = shapely.STRtree(geoms).query(geoms, predicate="intersects")
    graph = coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(n, n))
    _, label = connected_components(graph, directed=False)
    order = np.argsort(label, kind="stable")
    return np.split(order, np.flatnonzero(np.diff(label[order])) + 1)


def dissolve(geoms: Any) -> Any:
    """The parts of the union of ``geoms``, dissolved per cluster of intersecting
    geometries (``clusters``), not as one overlay of all."""
    geoms = np.asarray(geoms, dtype=object)
    parts = []
    for group in clusters(geoms):
        merged = geoms[group[0]] if len(group) == 1 else shapely.union_all(geoms[group])
        parts.extend(shapely.get_parts(merged))
    return np.asarray(parts, dtype=object)


def batch_ids(bounds: Any, size: int, sweep_m: float = SWEEP_M) -> tuple[npt.NDArray[np.intp], int]:
    """The overlay batch of each geometry, from its bounds alone, and the batch count.

    A batch is whole clusters of geometries whose bounding boxes intersect one another,
    directly or through others (an STRtree on the boxes and connected components), packed
    up to ``size`` geometries (a larger cluster is a batch of its own). Every step of the
    overlay relates only intersecting geometries (a site and the previous mining it
    touches, the history under it, the footprint's parts and the sites on them), and
    geometries that intersect have intersecting boxes, so running it batch by batch gives
    the rows of one overlay of all. Clusters are packed in sweeps of ``sweep_m`` metres,
    south to north and west to east, so that a batch covers a compact area (the NDVI
    reads of neighbouring batches share their tiles). Empty geometries are clusters of
    their own.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if size < 1:
        raise ValueError(f"overlay batch size must be at least 1, got {size}")
    bounds = np.asarray(bounds, dtype=float).reshape(-1, 4)
    n = len(bounds)
    if n == 0:
        return np.empty(0, np.intp), 0
    real = np.flatnonzero(np.isfinite(bounds).all(axis=1))
    boxes = shapely.box(*bounds[real].T)
    a, b = shapely.STRtree(boxes).query(boxes, predicate="intersects")
    graph = coo_matrix((np.ones(len(a), np.int8), (real[a], real[b])), shape=(n, n))
    count, label = connected_components(graph, directed=False)
    south, west = np.full(count, np.inf), np.full(count, np.inf)
    np.fmin.at(south, label, bounds[:, 1])
    np.fmin.at(west, label, bounds[:, 0])
    first = np.full(count, n)
    np.minimum.at(first, label, np.arange(n))
    row = np.where(np.isfinite(south), np.floor(south / sweep_m), -np.inf)
    col = np.where(np.isfinite(west), np.floor(west / sweep_m), -np.inf)
    order = np.lexsort((first, col, row))
    members = np.bincount(label, minlength=count)
    batch_of = np.empty(count, np.intp)
    batch, filled = 0, 0
    for c, k in zip(order.tolist(), members[order].tolist(), strict=True):
        if filled and filled + k > size:
            batch, filled = batch + 1, 0
        batch_of[c] = batch
        filled += k
    return batch_of[label], batch + 1


def _local_unions(geoms: Any, others: Any) -> Any:
    """For each geometry, the union of the ``others`` it intersects (an STRtree finds
    them): what an overlay with the union of all ``others`` sees, in linear time."""
    out = np.full(len(geoms), None, dtype=object)
    if len(geoms) == 0 or len(others) == 0:
        out[:] = [shapely.Polygon()] * len(geoms)
        return out
    gi, oi = shapely.STRtree(others).query(geoms, predicate="intersects")
    order = np.argsort(gi, kind="stable")
    gi, oi = gi[order], oi[order]
    splits = np.flatnonzero(np.diff(gi)) + 1
    for g, group in zip(np.split(gi, splits), np.split(oi, splits), strict=True):
        if len(g):
            out[g[0]] = others[group[0]] if len(group) == 1 else shapely.union_all(others[group])
    out[[v is None for v in out]] = shapely.Polygon()
    return out


def _rows(
    region_id: str,
    period_id: str,
    kinds: list[str],
    geoms: list[shapely.Geometry],
    firsts: list[str],
    site_ids: list[str | None],
    ndvis: list[float],
) -> dict[str, Any]:
    """The change columns, slivers dropped (overlays leave lines, points and parts under
    ``MIN_PART_HA``), ids a digest of the kind and the geometry in normal form."""
    polys = np.asarray([polygonal_part(g) for g in geoms], dtype=object)
    area = shapely.area(polys) / 10_000 if len(polys) else np.empty(0)
    keep: Any = (
        np.flatnonzero(~shapely.is_empty(polys) & (area >= MIN_PART_HA)) if len(polys) else []
    )
    # The id hashes the geometry in normal form (1 cm grid, no collinear vertices,
    # canonical ring order): the same area gets the same id however an overlay drew it.
    canon = shapely.normalize(shapely.simplify(shapely.set_precision(polys[keep], 0.01), 0))
    wkb = shapely.to_wkb(canon) if len(keep) else []
    ids = [
        f"{region_id}-{period_id}-{kinds[i]}-"
        + hashlib.sha1(f"{region_id}|{period_id}|{kinds[i]}|".encode() + w).hexdigest()[:12]
        for i, w in zip(keep, wkb, strict=True)
    ]
    return {
        "change_id": ids,
        "region": [region_id] * len(keep),
        "period": [period_id] * len(keep),
        "kind": [kinds[i] for i in keep],
        "area_ha": [round(float(area[i]), 4) for i in keep],
        "first_seen_period": [firsts[i] for i in keep],
        "site_id": [site_ids[i] for i in keep],
        "mean_ndvi": [ndvis[i] for i in keep],
        "geometry": polys[keep] if len(keep) else [],
    }


@dataclass
class _Spill:
    """An input table cleaned into the region's UTM zone, on disk (``row``, WKB
    ``geometry`` and the columns asked for), with each geometry's bounds in memory."""

    path: Path
    bounds: npt.NDArray[np.float64]
    area_ha: npt.NDArray[np.float64]


def _spill(source: Path, epsg: int, target: Path, columns: tuple[str, ...], what: str) -> _Spill:
    """``source`` (GeoParquet) cleaned (``_clean``) chunk by chunk into ``target``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [("row", pa.int64()), ("geometry", pa.binary()), *((c, pa.string()) for c in columns)]
    )
    bounds, areas, rows = [], [], 0
    with pq.ParquetWriter(target, schema) as writer:
        for geoms, cols in read_chunks(source, (*columns, "area_ha")):
            if geoms.crs is None:
                raise GeoTableError(f"{source}: the {what} have no CRS")
            clean = _clean(geoms, epsg)
            table = pa.table(
                {
                    "row": np.arange(rows, rows + len(clean), dtype=np.int64),
                    "geometry": shapely.to_wkb(clean),
                    **{c: cols[c].cast(pa.string()) for c in columns},
                },
                schema=schema,
            )
            writer.write_table(table)
            bounds.append(shapely.bounds(clean))
            areas.append(cols["area_ha"].to_numpy(zero_copy_only=False).astype(np.float64))
            rows += len(clean)
    return _Spill(
        target,
        np.concatenate(bounds) if bounds else np.empty((0, 4)),
        np.concatenate(areas) if areas else np.empty(0),
    )


FLOAT_COLUMNS = ("area_ha", "mean_ndvi")  # the rest: strings and the geometry


@dataclass
class ChangeTable:
    """What ``change_table`` wrote: the GeoParquet, its row count and the summary."""

    path: Path
    rows: int
    summary: dict[str, Any]
    notes: list[str] = field(default_factory=list)


class _Rows:
    """Change rows gathered for one batch, then spilled (EPSG:4326, WKB) to a scratch
    Parquet; the areas by kind summed exactly, in units of the rounded ``area_ha``."""

    def __init__(self, region_id: str, period_id: str, epsg: int, target: Path) -> None:
        import pyarrow as pa

        self.region_id, self.period_id, self.epsg = region_id, period_id, epsg
        kind = {"geometry": pa.binary(), "area_ha": pa.float64(), "mean_ndvi": pa.float64()}
        self.spill = RowSpill(target, pa.schema([(c, kind.get(c, pa.string())) for c in COLUMNS]))
        self.area_e4 = dict.fromkeys(KINDS, 0)  # sum of area_ha x 10,000 (exact integers)
        self._clear()

    def _clear(self) -> None:
        self.kinds: list[str] = []
        self.geoms: list[shapely.Geometry] = []
        self.firsts: list[str] = []
        self.site_ids: list[str | None] = []
        self.ndvis: list[float] = []

    def add(self, kind: str, geom: Any, first: Any, site: Any, ndvi: Any) -> None:
        """Rows of one kind; each argument a sequence of the same length."""
        self.kinds.extend([kind] * len(geom))
        self.geoms.extend(geom)
        self.firsts.extend(first)
        self.site_ids.extend(site)
        self.ndvis.extend(ndvi)

    def flush(self) -> None:
        import geopandas as gpd

        rows = _rows(self.region_id, self.period_id, self.kinds, self.geoms, self.firsts, self.site_ids, self.ndvis)  # fmt: skip
        self._clear()
        if not rows["change_id"]:
            return
        # as GeoDataFrame.to_crs draws them: the same transformer, geometry by geometry
        rows["geometry"] = gpd.GeoSeries(rows["geometry"], crs=self.epsg).to_crs(4326).to_numpy()
        self.spill.write(rows)
        for kind, area in zip(rows["kind"], rows["area_ha"], strict=True):
            self.area_e4[kind] += round(area * 10_000)

    @property
    def count(self) -> int:
        return self.spill.rows


def _by_batch(spill: Path, batches: npt.NDArray[np.intp], target: Path) -> Path:
    """``spill`` sorted by batch (``batches``: the batch of each row), then by row, with
    a ``batch`` column: ``_batches`` reads it back a batch at a time."""
    order = np.argsort(batches, kind="stable")  # by batch, then row
    extra = {"batch": batches.astype(np.int64)}
    return sort_rows(spill, target, rank_of(order), target.parent, extra=extra)


def _batches(sorted_spill: Path) -> Iterator[tuple[int, Any]]:
    """The rows of a spill sorted by batch (``_by_batch``), one batch at a time in batch
    order: (batch, a pyarrow Table in row order, without the ``batch`` column). One
    sequential read of the file, ``READ_ROWS`` rows at a time."""
    import pyarrow as pa

    current = -1
    pending: list[Any] = []
    for chunk in streamed(sorted_spill).iter_batches(batch_size=READ_ROWS):
        ids = chunk.column("batch").to_numpy()
        cuts = [0, *(np.flatnonzero(np.diff(ids)) + 1).tolist(), len(ids)]
        for start, end in itertools.pairwise(cuts):
            if ids[start] != current and pending:
                yield current, pa.Table.from_batches(pending).drop_columns(["batch"])
                pending = []
            current = int(ids[start])
            pending.append(chunk.slice(start, end - start))
    if pending:
        yield current, pa.Table.from_batches(pending).drop_columns(["batch"])


def _aligned(sorted_spills: list[Path], count: int) -> Iterator[list[Any]]:
    """For each batch ``0 .. count - 1``, its rows in each of ``sorted_spills`` (an
    empty table where a spill has none)."""
    readers = [_batches(path) for path in sorted_spills]
    empty = [streamed(path).schema_arrow.empty_table().drop_columns(["batch"]) for path in sorted_spills]  # fmt: skip
    heads = [next(r, None) for r in readers]
    for b in range(count):
        parts = []
        for k, head in enumerate(heads):
            if head is not None and head[0] == b:
                parts.append(head[1])
                heads[k] = next(readers[k], None)
            else:
                parts.append(empty[k])
        yield parts


def _strings(column: Any) -> list[Any]:
    return list(column.to_pylist())


def change_table(
    region: Region,
    period_id: str,
    sites: Path,
    previous_sites: Path | None,
    target: Path,
    *,
    previous_change: Path | None = None,
    composite: Path | None = None,
    batch_size: int = OVERLAY_BATCH,
    progress: Callable[[str], None] | None = None,
    mmu_ha: float | None = None,
) -> ChangeTable:
    """The change rows of ``period_id`` written to ``target`` (GeoParquet, atomically),
    from the GeoParquet tables of this period's sites, the previous period's
    (``previous_sites`` None: the region's first period) and the previous period's
    change rows; the summary without growth factors (``summarise`` adds them).
    Abandoned and re-vegetating parts below ``mmu_ha`` (the sites' minimum mapping
    unit) are left out: edge jitter between two maps of a site, not land given up.
    ``mmu_ha`` None: the unit the two sites files record (``sites.recorded_mmu``; the
    larger when they differ, and the summary notes it), ``MMU_HA`` when neither does.

    No table is held whole: each is read in chunks, cleaned into the region's UTM zone
    and spilled to a scratch folder beside ``target``; the overlay runs batch by batch
    (``batch_ids``: whole clusters of intersecting bounding boxes, at most about
    ``batch_size`` geometries), with the composite opened once for the NDVI of all
    batches; the rows are spilled as they come and sorted by ``change_id`` into ``target``
    (``geotable.write_sorted``). The rows do not depend on the batch size.
    """
    say = progress or (lambda _m: None)
    epsg = bbox_utm_epsg(region.bbox)
    notes: list[str] = []
    prev_period = region.previous_period(period_id)
    target.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=".change-", dir=target.parent) as scratch:
        work = Path(scratch)
        cur = _spill(sites, epsg, work / "cur.parquet", ("site_id", "first_seen_period"), "sites")  # fmt: skip
        rows = _Rows(region.id, period_id, epsg, work / "rows.parquet")
        if previous_sites is None:
            notes.append(NOTE_FIRST_PERIOD)
            say(f"{period_id}: {len(cur.area_ha)} sites, the region's first period: all new")
            for chunk in streamed(cur.path).iter_batches(batch_size=READ_ROWS):  # in order
                g = shapely.from_wkb(chunk.column("geometry"))
                own = [v or period_id for v in _strings(chunk.column("first_seen_period"))]
                rows.add("new", g, own, _strings(chunk.column("site_id")), [np.nan] * len(g))
                rows.flush()
        else:
            prev = _spill(previous_sites, epsg, work / "prev.parquet", (), "previous sites")
            if mmu_ha is None:  # both files read: the unit they record
                mmu_ha = _recorded_unit(sites, previous_sites, prev_period, notes, say)
            hist = None
            if previous_change is not None:
                hist = _spill(previous_change, epsg, work / "hist.parquet", ("first_seen_period",), "previous change rows")  # fmt: skip
                if not len(hist.bounds):
                    hist = None
            if hist is None:
                notes.append(NOTE_NO_HISTORY.format(period=prev_period.id if prev_period else "the previous period"))  # fmt: skip
            bound = prev_period.id if prev_period else period_id
            tables = [cur, prev, *([hist] if hist is not None else [])]
            ids, count = batch_ids(np.concatenate([t.bounds for t in tables]), batch_size)
            splits = np.cumsum([len(t.bounds) for t in tables])[:-1]
            ordered = [
                _by_batch(t.path, b, work / f"by-batch-{k}.parquet")
                for k, (t, b) in enumerate(zip(tables, np.split(ids, splits), strict=True))
            ]
            say(
                f"{period_id}: {len(cur.bounds)} sites against {len(prev.bounds)} previous and "
                f"{len(hist.bounds) if hist is not None else 0} history rows, in {count} batches"
            )
            reader = NdviReader(composite) if composite is not None and composite.exists() else None
            if reader is None:
                notes.append(NOTE_NO_COMPOSITE)
            with reader if reader is not None else contextlib.nullcontext():
                last = time.perf_counter()
                for b, parts in enumerate(_aligned(ordered, count)):
                    _overlay(rows, period_id, bound, parts, reader, epsg, mmu_ha)
                    rows.flush()
                    if time.perf_counter() - last > PROGRESS_S or b == count - 1:
                        last = time.perf_counter()
                        say(f"{period_id}: batch {b + 1}/{count}, {rows.count} rows")
        mining = pd_sum(cur.area_ha)
        write_sorted(rows.spill, "change_id", target, _typed, 4326)
    say(
        f"{period_id}: {rows.count} change rows written to {target} in {time.perf_counter() - started:.1f} s"
    )
    summary = {
        "region": region.id,
        "period": period_id,
        "period_start": region.period(period_id).start,
        "site_count": len(cur.area_ha),
        "mining_ha": round(mining, 4) if len(cur.area_ha) else 0.0,
        **{f"{k}_ha": round(rows.area_e4[k] / 10_000, 4) for k in KINDS},
        "previous_period": prev_period.id if previous_sites is not None and prev_period else None,
        "notes": "; ".join(notes),
    }
    summary = summarise(summary, None, None)  # the growth columns, filled by the caller
    return ChangeTable(path=target, rows=rows.count, summary=summary, notes=notes)


def _recorded_unit(
    sites: Path,
    previous_sites: Path | None,
    prev_period: Any,
    notes: list[str],
    say: Callable[[str], None],
) -> float:
    """The minimum mapping unit for former mining: what the sites files record."""
    from pipelines.stages.sites import recorded_mmu

    current = recorded_mmu(sites)
    previous = recorded_mmu(previous_sites) if previous_sites is not None else None
    known = [v for v in (current, previous) if v is not None]
    if not known:
        say(
            f"the sites files record no minimum mapping unit (imported, or written before "
            f"it was recorded): former mining is counted from the default, {number(MMU_HA)} ha"
        )
        return MMU_HA
    used = max(known)
    if current is not None and previous is not None and current != previous:
        note = NOTE_MMU_DIFFERS.format(
            previous_period=prev_period.id if prev_period else "the previous period",
            previous=number(previous), current=number(current), used=number(used),
        )  # fmt: skip
        notes.append(note)
        say(f"warning: {note}")
    return used


def pd_sum(values: npt.NDArray[np.float64]) -> float:
    """A column's sum as pandas sums it (the figure the summary always carried)."""
    import pandas as pd

    return float(pd.Series(values, dtype="float64").sum())


def mining_ha(sites: Path) -> float:
    """The mining area of a sites GeoParquet (its ``area_ha`` column alone is read)."""
    import pyarrow.parquet as pq

    column = pq.read_table(sites, columns=["area_ha"]).column("area_ha")
    return pd_sum(column.to_numpy().astype(np.float64))


def _typed(frame: Any) -> Any:
    """The change columns in order, with their dtypes (floats and pandas strings)."""
    frame = frame[list(COLUMNS)]
    for col in COLUMNS:
        if col in FLOAT_COLUMNS:
            frame[col] = frame[col].astype("float64")
        elif col != "geometry":
            frame[col] = frame[col].astype("string")
    return frame


def _overlay(
    rows: _Rows,
    period_id: str,
    bound: str,
    parts: list[Any],
    reader: NdviReader | None,
    epsg: int,
    mmu_ha: float = MMU_HA,
) -> None:
    """The change rows of one batch (``parts``: its rows of this period's sites, the
    previous period's and, if any, the previous change), added to ``rows``.

    Everything here only meets geometries of its own batch (a batch is whole clusters
    of intersecting geometries): the rows are those of one overlay of all.
    """
    cur, prev = parts[0], parts[1]
    c_g = shapely.from_wkb(cur.column("geometry"))
    p_g = shapely.from_wkb(prev.column("geometry"))
    c_ids = _strings(cur.column("site_id"))
    own = [v or period_id for v in _strings(cur.column("first_seen_period"))]
    if len(parts) > 2:
        h_g = shapely.from_wkb(parts[2].column("geometry"))
        h_first = [str(v) for v in _strings(parts[2].column("first_seen_period"))]
    else:
        h_g, h_first = np.empty(0, object), []
    near = _local_unions(c_g, p_g)  # per site: the previous mining it touches
    kept = shapely.intersection(c_g, near)
    fresh = shapely.area(kept) / 10_000 < MIN_PART_HA
    idx = np.flatnonzero(fresh)
    nan = [np.nan] * len(idx)
    rows.add("new", c_g[idx], [own[i] for i in idx], [c_ids[i] for i in idx], nan)
    idx = np.flatnonzero(~fresh)
    nan = [np.nan] * len(idx)
    rows.add("stable", kept[idx], _earliest(kept[idx], h_g, h_first, bound), [c_ids[i] for i in idx], nan)  # fmt: skip
    grown = shapely.difference(c_g[idx], near[idx])
    rows.add("expanded", grown, [period_id] * len(idx), [c_ids[i] for i in idx], nan)
    # Everything mined before (last period's sites and the footprint its change carried),
    # in connected parts, minus the mining of this period that touches it.
    footprint = dissolve(np.concatenate([p_g, h_g]))
    left = shapely.difference(footprint, _local_unions(footprint, c_g))
    gone = shapely.get_parts(left[~shapely.is_empty(left)])
    # Former mining below the minimum mapping unit is the edge jitter of two maps of the
    # same site (one-pixel parts), not land that stopped being mined: not counted.
    gone = gone[shapely.area(gone) / 10_000 >= max(mmu_ha, MIN_PART_HA)]
    first = _earliest(gone, h_g, h_first, bound)
    ndvi = reader.means(gone, epsg) if reader is not None else np.full(len(gone), np.nan)
    green = np.isfinite(ndvi) & (ndvi >= NDVI_RECOVERED)
    for kind, sel in (("revegetating", green), ("abandoned", ~green)):
        i = np.flatnonzero(sel)
        rows.add(kind, gone[i], [first[k] for k in i], [None] * len(i), ndvi[i].tolist())


def detect_change(
    region: Region,
    period_id: str,
    current: Any,
    previous: Any | None,
    *,
    previous_change: Any | None = None,
    composite: Path | None = None,
    batch_size: int = OVERLAY_BATCH,
    mmu_ha: float = MMU_HA,
) -> ChangeResult:
    """``change_table`` for frames (sites in EPSG:4326; ``previous`` None: the region's
    first period), the rows as a frame: the tables go through scratch GeoParquet files."""
    import geopandas as gpd

    with tempfile.TemporaryDirectory(prefix="asmwatch-change-") as scratch:
        work = Path(scratch)

        def put(frame: Any, name: str) -> Path | None:
            if frame is None:
                return None
            frame.to_parquet(work / name, write_covering_bbox=True, index=False)
            return work / name

        table = change_table(
            region, period_id, put(current, "sites.parquet"),  # type: ignore[arg-type]
            put(previous, "previous.parquet"), work / "change.parquet",
            previous_change=put(previous_change, "history.parquet"), composite=composite,
            batch_size=batch_size, mmu_ha=mmu_ha,
        )  # fmt: skip
        frame = gpd.read_parquet(table.path)
    return ChangeResult(frame=frame, summary=table.summary, notes=table.notes)


def summarise(
    summary: dict[str, Any], previous_mining_ha: float | None, first: tuple[str, float] | None
) -> dict[str, Any]:
    """Add growth factors: against the previous period and against the region's first."""
    out = dict(summary)
    out["previous_mining_ha"] = previous_mining_ha
    out["growth_vs_previous"] = (
        round(out["mining_ha"] / previous_mining_ha, 4) if previous_mining_ha else None
    )
    out["first_period"] = first[0] if first else None
    out["first_mining_ha"] = first[1] if first else None
    out["growth_vs_first"] = round(out["mining_ha"] / first[1], 4) if first and first[1] else None
    return out


def write_summary(summary: dict[str, Any], root: Path, region_id: str, period_id: str) -> Path:
    """The one-row summary Parquet, written atomically."""
    import pandas as pd

    frame = pd.DataFrame([summary])
    for col in SUMMARY_FLOATS:  # a first period's nulls must still be DOUBLE columns
        if col in frame:
            frame[col] = frame[col].astype("float64")
    for col in ("previous_period", "first_period", "notes"):
        if col in frame:
            frame[col] = frame[col].astype("string")
    target = summary_path(root, region_id, period_id)
    with atomic_path(target) as tmp:
        frame.to_parquet(tmp, index=False)
    return target


def write_change(result: ChangeResult, root: Path, region_id: str, period_id: str) -> Path:
    """A change frame's GeoParquet and its summary, each written atomically (the asset
    writes the GeoParquet as ``change_table`` goes; this is for frames)."""
    target = change_path(root, region_id, period_id)
    with atomic_path(target) as tmp:
        result.frame.to_parquet(tmp, write_covering_bbox=True, index=False)
    write_summary(result.summary, root, region_id, period_id)
    return target


@dataclass
class PeriodChange:
    """What ``change_for_period`` wrote: the change table, the summary row and its file."""

    table: ChangeTable
    summary: dict[str, Any]
    summary_path: Path


def change_for_period(
    root: Path,
    region: Region,
    period_id: str,
    progress: Callable[[str], None] | None = None,
    mmu_ha: float | None = None,
) -> PeriodChange:
    """The change of one region's period against the one before, and its summary row.

    Reads this period's and the previous period's sites, the previous change (for
    first-seen periods) and the composite (for re-vegetation) from the data root;
    writes ``change/`` and ``summary/``. ``MissingInputError`` names the sites to
    materialise first when this period's or the previous one's are missing.
    """
    here = sites_path(root, region.id, period_id)
    if not here.exists():
        raise MissingInputError(
            f"no sites at {here}: materialise `asm_sites` for {region.id}/{period_id} first"
        )
    prev = region.previous_period(period_id)
    there = last = None
    if prev is not None:
        there = sites_path(root, region.id, prev.id)
        if not there.exists():
            raise MissingInputError(
                f"asm_change {region.id}/{period_id} compares with the previous "
                f"period, {prev.id}, whose sites are missing ({there}): materialise "
                f"`asm_sites` for {region.id}/{prev.id} first"
            )
        last = change_path(root, region.id, prev.id)
    comp = composite_path(root, region.id, period_id)
    table = change_table(
        region, period_id, here, there, change_path(root, region.id, period_id),
        previous_change=last if last is not None and last.exists() else None,
        composite=comp if comp.exists() else None,
        progress=progress, mmu_ha=mmu_ha,
    )  # fmt: skip
    first_period = region.periods[0]
    first = None
    if first_period.id == period_id:
        first = (period_id, table.summary["mining_ha"])
    elif (p := sites_path(root, region.id, first_period.id)).exists():
        first = (first_period.id, mining_ha(p))
    prev_ha = mining_ha(there) if there is not None else None
    summary = summarise(table.summary, prev_ha, first)
    path = write_summary(summary, root, region.id, period_id)
    return PeriodChange(table, summary, path)
