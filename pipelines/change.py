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

Parts smaller than ``MIN_PART_HA`` (one 10 m pixel) are overlay slivers and are dropped.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import rasterio
import rasterio.errors
import rasterio.features
import shapely
from pyproj import Transformer

from pipelines.grid import bbox_utm_epsg
from pipelines.regions import Region, RegionsError, parse_period
from pipelines.storage import atomic_path, partition_path
from pipelines.tiling import DEFAULT_TILE, Span, Tiling, read_window
from pipelines.vectors import polygonal_part

KINDS = ("new", "expanded", "stable", "abandoned", "revegetating")
# Mean composite NDVI at which formerly mined land counts as re-vegetating. Bare tailings,
# sediment and ponds stay below about 0.25 (the demo's spectra: 0.12); first-year
# regrowth reaches about 0.4, older regrowth 0.7; intact lowland forest is above 0.8.
NDVI_RECOVERED = 0.35
MIN_PART_HA = 0.01
NDVI_HALO = 256  # px: parts up to this size are cut from their tile's NDVI window
#: Input geometries per batch of the overlay (``overlay_batches``): its intermediate
#: geometries are those of one batch at a time.
OVERLAY_BATCH = 2000
COLUMNS = (
    "change_id", "region", "period", "kind", "area_ha", "first_seen_period", "site_id",
    "mean_ndvi", "geometry",
)  # fmt: skip


#: Summary columns that are DOUBLE in every file, null or not.
SUMMARY_FLOATS = (
    "mining_ha", *(f"{k}_ha" for k in KINDS), "previous_mining_ha", "growth_vs_previous",
    "first_mining_ha", "growth_vs_first",
)  # fmt: skip


def change_path(root: Path, region_id: str, period_id: str) -> Path:
    return partition_path(root, "change", region_id, period_id, ".parquet")


def summary_path(root: Path, region_id: str, period_id: str) -> Path:
    return partition_path(root, "summary", region_id, period_id, ".parquet")


@dataclass
class ChangeResult:
    frame: Any  # GeoDataFrame, EPSG:4326, COLUMNS
    summary: dict[str, Any]
    notes: list[str] = field(default_factory=list)


def ndvi_means(
    composite: Path, parts: Any, crs_of_parts: int, tile_px: int = DEFAULT_TILE
) -> npt.NDArray[np.float64]:
    """Mean composite NDVI over each polygon of ``parts`` (all touched pixels); NaN where
    unobserved or outside the composite.

    The composite is opened once and read tile by tile (``pipelines.tiling``): each
    tile's NDVI window, with a halo, serves every part whose pixels lie inside it; a part
    larger than that is read on its own.
    """
    out = np.full(len(parts), np.nan)
    if not len(parts):
        return out
    with rasterio.Env(), rasterio.open(composite) as src:  # one GDAL environment for all
        band = list(src.descriptions).index("NDVI") + 1
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
        tiling = Tiling(src.height, src.width, tile_px, halo=NDVI_HALO)
        key = (r0c // tile_px) * tiling.cols + (c0c // tile_px)
        fits = inside & (r1c - r0c <= NDVI_HALO) & (c1c - c0c <= NDVI_HALO)
        for k in np.unique(key[fits]):
            tile = tiling.tile(int(k) // tiling.cols, int(k) % tiling.cols)
            idx = np.flatnonzero(fits & (key == k))
            buf = read_window(src, band, tile.read, composite)
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
            data = read_window(src, band, span, composite)
            out[j] = _mean_in(data, geoms[j], src.window_transform(span.window))
    return out


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


def _clean(frame: Any, epsg: int) -> Any:
    """``frame`` in UTM with valid polygonal geometries snapped to 1 cm.

    Pixel-edge polygons that went to EPSG:4326 and back can touch themselves by a
    rounding error, which GEOS overlay refuses; snapping to a centimetre grid repairs
    that without moving anything by more than a centimetre.
    """
    out = frame.to_crs(epsg)
    geoms = shapely.set_precision(shapely.make_valid(out.geometry.to_numpy()), 0.01)
    polys = [polygonal_part(g) for g in geoms]
    return out.set_geometry(np.asarray(polys, dtype=object), crs=epsg)


def _start(period_id: str) -> Any:
    try:
        return parse_period(period_id).start
    except RegionsError:  # a custom {id, start, end} period of another region: sort last
        return parse_period("2100").start


def _earliest(geoms: Any, history: Any, fallback: str) -> list[str]:
    """For each geometry, the earliest first_seen_period of the history rows it overlaps
    (by area; an STRtree finds the candidates), else ``fallback``."""
    out = [fallback] * len(geoms)
    if history is None or len(history) == 0 or len(geoms) == 0:
        return out
    shapes = history.geometry.to_numpy()
    tree = shapely.STRtree(shapes)
    gi, hi = tree.query(np.asarray(geoms, dtype=object), predicate="intersects")
    if len(gi) == 0:
        return out
    overlap = shapely.area(shapely.intersection(np.asarray(geoms, dtype=object)[gi], shapes[hi]))
    gi, hi = gi[overlap > 0], hi[overlap > 0]
    starts = history["period_start"].map(lambda d: d.toordinal()).to_numpy()[hi]
    firsts = history["first_seen_period"].astype(str).to_numpy()[hi]
    order = np.lexsort((firsts, starts, gi))  # by geometry, then earliest start, then name
    gi, firsts = gi[order], firsts[order]
    first_of = np.flatnonzero(np.r_[True, gi[1:] != gi[:-1]])
    for g, f in zip(gi[first_of].tolist(), firsts[first_of].tolist(), strict=True):
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


def overlay_batches(
    cur: Any, prev: Any, hist: Any, size: int
) -> Iterator[tuple[npt.NDArray[np.intp], npt.NDArray[np.intp], npt.NDArray[np.intp]]]:
    """Indices into ``cur``, ``prev`` and ``hist`` (UTM geometries), batch by batch: each
    batch is whole ``clusters`` of the three together, packed in order up to ``size``
    geometries (a larger cluster is a batch of its own).

    Every step of the overlay relates only intersecting geometries (a site and the
    previous mining it touches, the history under it, the footprint's parts and the
    sites on them), so running it on each batch gives the rows of one overlay of all.
    """
    if size < 1:
        raise ValueError(f"overlay batch size must be at least 1, got {size}")
    n_cur, n_prev = len(cur), len(prev)
    batch: list[npt.NDArray[np.intp]] = []
    count = 0
    for group in clusters(np.concatenate([np.asarray(g, dtype=object) for g in (cur, prev, hist)])):
        if batch and count + len(group) > size:
            yield _split_batch(np.concatenate(batch), n_cur, n_prev)
            batch, count = [], 0
        batch.append(group)
        count += len(group)
    if batch:
        yield _split_batch(np.concatenate(batch), n_cur, n_prev)


def _split_batch(
    members: npt.NDArray[np.intp], n_cur: int, n_prev: int
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp], npt.NDArray[np.intp]]:
    members = np.sort(members)
    return (
        members[members < n_cur],
        members[(members >= n_cur) & (members < n_cur + n_prev)] - n_cur,
        members[members >= n_cur + n_prev] - n_cur - n_prev,
    )


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


def detect_change(
    region: Region,
    period_id: str,
    current: Any,
    previous: Any | None,
    *,
    previous_change: Any | None = None,
    composite: Path | None = None,
    batch_size: int = OVERLAY_BATCH,
) -> ChangeResult:
    """Change rows for ``period_id`` (sites frames in EPSG:4326; ``previous`` None: first).

    The overlay runs batch by batch (``overlay_batches``), so its intermediate geometries
    are those of at most about ``batch_size`` input geometries at a time; the rows do
    not depend on it.
    """
    import geopandas as gpd

    epsg = bbox_utm_epsg(region.bbox)
    notes: list[str] = []
    cur = _clean(current, epsg)
    prev_period = region.previous_period(period_id)
    kinds: list[str] = []
    geoms: list[shapely.Geometry] = []
    firsts: list[str] = []
    site_ids: list[str | None] = []
    ndvis: list[float] = []

    def add(kind: str, geom: Any, first: Any, site: Any, ndvi: Any) -> None:
        """Rows of one kind; each argument a sequence of the same length."""
        kinds.extend([kind] * len(geom))
        geoms.extend(geom)
        firsts.extend(first)
        site_ids.extend(site)
        ndvis.extend(ndvi)

    own = [
        str(v) if isinstance(v, str) and v else period_id
        for v in cur.get("first_seen_period", [None] * len(cur))
    ]
    cur_g = cur.geometry.to_numpy()
    cur_ids = [str(v) for v in cur["site_id"]]
    if previous is None:
        add("new", cur_g, own, cur_ids, [np.nan] * len(cur))
        notes.append("first period of the region: all its mining is new (the baseline)")
    else:
        prev = _clean(previous, epsg)
        history = None
        if previous_change is not None and len(previous_change):
            history = _clean(previous_change, epsg)
            history = history.assign(
                period_start=[_start(str(v)) for v in history["first_seen_period"]]
            )
        else:
            notes.append(
                f"no asm_change for {prev_period.id if prev_period else 'the previous period'}: "
                "first_seen_period of older mining is a bound (that period), and land "
                "abandoned before it is not tracked"
            )
        bound = prev_period.id if prev_period else period_id
        prev_g = prev.geometry.to_numpy()
        hist_g = history.geometry.to_numpy() if history is not None else np.empty(0, object)
        gone_parts: list[Any] = []
        gone_first: list[str] = []
        for ci, pi, hi in overlay_batches(cur_g, prev_g, hist_g, batch_size):
            # Everything below only meets geometries of its own batch (a batch is whole
            # clusters of intersecting geometries): the rows are those of one overlay.
            c_g, p_g = cur_g[ci], prev_g[pi]
            hist = history.iloc[hi] if history is not None else None
            near = _local_unions(c_g, p_g)  # per site: the previous mining it touches
            kept = shapely.intersection(c_g, near)
            fresh = shapely.area(kept) / 10_000 < MIN_PART_HA
            idx = np.flatnonzero(fresh)
            add("new", c_g[idx], [own[i] for i in ci[idx]], [cur_ids[i] for i in ci[idx]], [np.nan] * len(idx))  # fmt: skip
            idx = np.flatnonzero(~fresh)
            add("stable", kept[idx], _earliest(kept[idx], hist, bound), [cur_ids[i] for i in ci[idx]], [np.nan] * len(idx))  # fmt: skip
            grown = shapely.difference(c_g[idx], near[idx])
            add("expanded", grown, [period_id] * len(idx), [cur_ids[i] for i in ci[idx]], [np.nan] * len(idx))  # fmt: skip
            # Everything mined before (last period's sites and the footprint its change
            # carried), in connected parts, minus the mining of this period that touches it.
            footprint = dissolve(p_g if hist is None else np.concatenate([p_g, hist_g[hi]]))
            left = shapely.difference(footprint, _local_unions(footprint, c_g))
            gone = shapely.get_parts(left[~shapely.is_empty(left)])
            gone = gone[shapely.area(gone) / 10_000 >= MIN_PART_HA]
            gone_parts.append(gone)
            gone_first.extend(_earliest(gone, hist, bound))
        gone = np.concatenate(gone_parts) if gone_parts else np.empty(0, object)
        ndvi = np.full(len(gone), np.nan)
        if composite is not None and composite.exists():
            ndvi = ndvi_means(composite, gone, epsg)  # the composite opened once
        else:
            notes.append("no composite for this period: re-vegetation not assessed")
        green = np.isfinite(ndvi) & (ndvi >= NDVI_RECOVERED)
        for kind, sel in (("revegetating", green), ("abandoned", ~green)):
            i = np.flatnonzero(sel)
            add(kind, gone[i], [gone_first[k] for k in i], [None] * len(i), ndvi[i].tolist())

    rows = _rows(region.id, period_id, kinds, geoms, firsts, site_ids, ndvis)
    frame = gpd.GeoDataFrame(rows, columns=list(COLUMNS), geometry="geometry", crs=epsg)
    frame = frame.sort_values("change_id").reset_index(drop=True).to_crs(4326)
    for col in ("area_ha", "mean_ndvi"):
        frame[col] = frame[col].astype("float64")
    for col in ("change_id", "region", "period", "kind", "first_seen_period", "site_id"):
        frame[col] = frame[col].astype("string")
    by_kind = {k: float(frame.loc[frame["kind"] == k, "area_ha"].sum()) for k in KINDS}
    summary = {
        "region": region.id,
        "period": period_id,
        "period_start": region.period(period_id).start,
        "site_count": len(current),
        "mining_ha": round(float(current["area_ha"].sum()), 4) if len(current) else 0.0,
        **{f"{k}_ha": round(v, 4) for k, v in by_kind.items()},
        "previous_period": prev_period.id if previous is not None and prev_period else None,
        "notes": "; ".join(notes),
    }
    summary = summarise(summary, None, None)  # the growth columns, filled by the caller
    return ChangeResult(frame=frame, summary=summary, notes=notes)


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


def write_change(result: ChangeResult, root: Path, region_id: str, period_id: str) -> Path:
    """The change GeoParquet and the one-row summary Parquet, each written atomically."""
    import pandas as pd

    target = change_path(root, region_id, period_id)
    with atomic_path(target) as tmp:
        result.frame.to_parquet(tmp, write_covering_bbox=True, index=False)
    summary = pd.DataFrame([result.summary])
    for col in SUMMARY_FLOATS:  # a first period's nulls must still be DOUBLE columns
        if col in summary:
            summary[col] = summary[col].astype("float64")
    for col in ("previous_period", "first_period", "notes"):
        if col in summary:
            summary[col] = summary[col].astype("string")
    with atomic_path(summary_path(root, region_id, period_id)) as tmp:
        summary.to_parquet(tmp, index=False)
    return target
