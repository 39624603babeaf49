"""Read: every scene's block of every band in one task, at the cost of decoding it.

odc-stac builds one dask task per file and block and warps every file onto the block's
grid with GDAL, which for the 20 m bands (B11, B12, SCL) costs several times their
decoding (issue 20; docs/performance.md). This module reads a block's files in the task
that reduces it, with the same numbers as ``odc.stac.load``:

* The plan is made once, on the client, with odc-stac's own parts: ``parse_items`` for
  the band sources, ``resolve_load_cfg`` for the load settings (dtype, nodata,
  resampling), its grouping order (``plan_observations``' key, then time and id) and
  its footprint test (a block is read for an item whose footprint is not disjoint
  from it, as ``GeoboxTiles.tiles``).
* A file on the block's grid (same CRS, axis-aligned, its pixel an integer multiple of
  the grid's, its corner on the grid) is read at its own resolution, the window the
  block needs and one pixel more, and brought onto the block here: pasted at the same
  resolution, repeated (nearest, any multiple) or, from twice the grid's pixel (the
  20 m bands), interpolated bilinearly as GDAL's warper does it (the four neighbours'
  weights, nodata left out and the rest renormalised, no value where the nearest
  source pixel is nodata, rounded half up). ``tests`` hold it equal to GDAL's warp
  pixel for pixel, nodata holes and scene edges included.
* Any other file (another CRS, a coarser grid read from overviews, a shifted grid,
  bilinear from another multiple) is read by odc-loader's own reader (``rio_read``):
  the same call odc-stac makes.
* Datasets stay open across blocks (a small cache per worker thread), so a block costs
  no header reads for files another block has opened.
* Read errors leave the file's pixels nodata and come back as messages, as odc-stac's
  ``fail_on_error=False`` does.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import rasterio
import rasterio.errors
import rasterio.windows

from pipelines.infra.tiling import reduce_average
from pipelines.stages.composite.inputs import (
    BAND_ROLES,
    GROUP_PROPERTY,
    L1C_ROLES,
    LOAD_ROLES,
    Observation,
    _href_path,
    _is_local,
    remote_gdal,
)
from pipelines.stages.composite.load import stac_items
from pipelines.stages.composite.reduce import composite_block

if TYPE_CHECKING:
    from distributed import Client
    from odc.geo.geobox import GeoBox

#: Open datasets kept per worker thread (each a file descriptor and its headers; COG
#: tile indexes for remote files), least recently used closed first. A period of 20
#: scenes reads 140 files; 256 per thread keeps two threads well under the usual limit
#: of 1024 descriptors.
OPEN_FILES = 256
#: GDAL's block cache while a block is read. Blocks start on the files' tiles, so a
#: decoded tile is not needed again; left at GDAL's default (5 % of the machine's memory)
#: the open files' tiles filled it: a full-tile worker peaked at 1.77 GiB, with this 0.74.
READ_CACHE_BYTES = 128 * 2**20
#: Errors of a file's read that leave its pixels nodata (odc-loader's list).
READ_ERRORS = (
    rasterio.errors.RasterioError,
    rasterio.errors.RasterioIOError,
    rasterio.errors.RasterBlockError,
    rasterio.errors.WarpOperationError,
    rasterio.errors.WindowEvaluationError,
)


@dataclass(frozen=True)
class StackPlan:
    """What every block task needs: the grid and its blocks, the load settings per band,
    and per observation its items (odc-stac's order) with their band sources and the
    blocks their footprints touch."""

    geobox: GeoBox
    rows: tuple[int, ...]  # block edges down the grid: 0, ..., height
    cols: tuple[int, ...]  # block edges across it: 0, ..., width
    roles: tuple[str, ...]
    cfg: Mapping[str, Any]  # role -> odc.loader.types.RasterLoadParams
    groups: tuple[tuple[int, ...], ...]  # per observation: item indexes
    sources: tuple[Mapping[str, Any], ...]  # per item: role -> RasterSource
    touches: tuple[frozenset[tuple[int, int]], ...]  # per item: (iy, ix) of its blocks
    gdal_env: Mapping[str, Any]
    observations: tuple[Observation, ...]
    s2cloudless: bool
    token: str  # one composite run: files opened for another run are closed first
    #: uri -> the pixels either side of its internal tiles' boundaries (``read_seams``),
    #: for the files read bilinearly from twice the grid's pixel (the 20 m bands)
    seams: Mapping[str, Seams] = dataclasses.field(default_factory=dict)
    pixel: Mapping[str, float] = dataclasses.field(default_factory=dict)  # uri -> STAC's pixel

    @property
    def blocks(self) -> list[tuple[int, int]]:
        return [(iy, ix) for iy in range(len(self.rows) - 1) for ix in range(len(self.cols) - 1)]  # fmt: skip

    def span(self, iy: int, ix: int) -> tuple[int, int, int, int]:
        """(row0, row1, col0, col1) of block (iy, ix) on the grid."""
        return self.rows[iy], self.rows[iy + 1], self.cols[ix], self.cols[ix + 1]

    @property
    def halves(self) -> bool:
        """Every block starts on an even row and column, so each block's own overview
        level 1 (2 x 2 averages) is the composite's there: the block tasks bring it
        (``composite_task``). The regions' grids are on 20 m, so always, in the pipeline."""
        return all(e % 2 == 0 for e in (*self.rows[:-1], *self.cols[:-1]))

    def block_geobox(self, iy: int, ix: int) -> GeoBox:
        r0, r1, c0, c1 = self.span(iy, ix)
        return self.geobox[r0:r1, c0:c1]


def block_edges(size: int, chunk: int, offset: int = 0) -> tuple[int, ...]:
    """Edges of blocks of ``chunk`` px along an axis of ``size`` px, the first edge
    after 0 at ``offset`` (mod ``chunk``): blocks that start where the input files'
    internal tiles start read each tile once (a thin first block takes the rest)."""
    first = offset % chunk
    edges = [0, *range(first or chunk, size, chunk), size]
    return tuple(dict.fromkeys(e for e in edges if 0 <= e <= size))


def tile_offset(tagged: Sequence[Mapping[str, Any]], geobox: GeoBox, roles: Sequence[str]) -> tuple[int, int]:  # fmt: skip
    """(row, column) offsets on the grid, modulo the tile's extent, of the internal tiles
    of the files of ``roles`` in the most scenes (one file read per role), taking the role
    whose tiles cover the most grid pixels: Sentinel-2's 10 m and 20 m files share their
    origin, so blocks on the 20 m tiles' edges lie on the 10 m tiles' too. (0, 0) when no
    file lies on the grid or none can be read here (the blocks then keep the grid's
    origin; nothing else depends on it)."""
    best: tuple[int, int, int] = (0, 0, 0)  # extent, row offset, column offset
    for role in roles:
        origins: collections.Counter[tuple[Any, ...]] = collections.Counter()
        hrefs: dict[tuple[Any, ...], str] = {}
        for raw in tagged:
            asset = raw["assets"].get(role) or {}
            key = (*(asset.get("proj:transform") or ()), raw.get("properties", {}).get("proj:epsg"))  # fmt: skip
            origins[key] += 1
            hrefs.setdefault(key, asset.get("href", ""))
        href = hrefs[origins.most_common(1)[0][0]] if origins else ""
        if not href:
            continue
        try:
            env = remote_gdal() if not _is_local(href) else {}
            with rasterio.Env(**env), rasterio.open(_href_path(href) if _is_local(href) else href) as ds:  # fmt: skip
                grid = _on_grid(ds, geobox)
                th, tw = ds.block_shapes[0]
        except (rasterio.errors.RasterioError, OSError, ValueError):
            continue
        if grid is not None:
            k, col, row = grid
            if min(th, tw) * k > best[0]:
                best = (min(th, tw) * k, row % (th * k), col % (tw * k))
    return best[1], best[2]


def plan_stack(
    tagged: Sequence[Mapping[str, Any]],
    observations: Sequence[Observation],
    geobox: GeoBox,
    *,
    chunk: int,
    resampling: str = "bilinear",
    s2cloudless: bool = False,
    align: bool = True,
) -> StackPlan:
    """The plan of ``load_stack``'s stack, made with odc-stac's parsing and settings."""
    import odc.stac
    from odc.loader import resolve_load_cfg

    roles = (*LOAD_ROLES, *(L1C_ROLES if s2cloudless else ()))
    if s2cloudless:  # as load_stack: the band list comes from an item with a twin
        tagged = sorted(tagged, key=lambda i: L1C_ROLES[0] not in i["assets"])
    remote = any(not _is_local(a["href"]) for raw in tagged for a in raw["assets"].values())
    parsed = list(odc.stac.parse_items(stac_items(tagged)))
    bands = {}
    for p in parsed:
        for (name, idx), src in p.bands.items():
            if name in roles and idx == 1 and name not in bands and src.meta is not None:
                bands[name] = src.meta
    # fail_on_error: odc-loader's reader raises, and ``read_onto`` turns the error into
    # nodata and a message the stage reports (as odc-stac's fail_on_error=False would
    # have it, but in the result rather than a worker's log).
    cfg = resolve_load_cfg(
        bands, resampling={"scl": "nearest", "*": resampling}, fail_on_error=True
    )
    # Blocks start where the scenes' internal tiles do (10 m and 20 m: blue and SCL).
    oy, ox = tile_offset(tagged, geobox, (LOAD_ROLES[0], "scl")) if align else (0, 0)
    h, w = geobox.shape.yx
    rows, cols = block_edges(h, chunk, oy), block_edges(w, chunk, ox)
    extents = {
        (iy, ix): geobox[rows[iy] : rows[iy + 1], cols[ix] : cols[ix + 1]].extent
        for iy in range(len(rows) - 1)
        for ix in range(len(cols) - 1)
    }
    touches = []
    for p in parsed:  # odc-stac's test: the footprint not disjoint from the block
        geom = p.safe_geometry(geobox.crs)
        touches.append(
            frozenset(b for b, ext in extents.items() if not geom.disjoint(ext))
            if geom is not None
            else frozenset()
        )
    keys = [str(raw["properties"][GROUP_PROPERTY]) for raw in tagged]
    order = sorted(range(len(parsed)), key=lambda i: (keys[i], parsed[i].nominal_datetime, parsed[i].id))  # fmt: skip
    by_key: dict[str, list[int]] = collections.defaultdict(list)
    for i in order:
        by_key[keys[i]].append(i)
    groups = tuple(tuple(by_key[o.key]) for o in observations)
    sources = tuple(
        {name: src for (name, idx), src in p.bands.items() if idx == 1 and name in roles}
        for p in parsed
    )
    pixel = {  # each file's pixel size by its item's proj:transform, where it has one
        src.uri: abs(float(t[0]))
        for raw, srcs in zip(tagged, sources, strict=True)
        for role, src in srcs.items()
        if (t := raw["assets"].get(role, {}).get("proj:transform")) and len(t) >= 6
    }
    return StackPlan(
        geobox=geobox, rows=rows, cols=cols, roles=roles, cfg=cfg, groups=groups, sources=sources,
        touches=tuple(touches), gdal_env=remote_gdal() if remote else {}, observations=tuple(observations),
        s2cloudless=s2cloudless, token=uuid.uuid4().hex, pixel=pixel,
    )  # fmt: skip


# --------------------------------------------------------------------------- files


class _OpenFiles(threading.local):
    """Datasets kept open by one thread for one composite run (``StackPlan.token``: a
    file rewritten between runs is opened again), least recently used closed first."""

    def __init__(self) -> None:
        self.files: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self.token = ""

    def get(self, uri: str, token: str) -> Any:
        if token != self.token:
            self.clear()
            self.token = token
        ds = self.files.pop(uri, None)
        if ds is None:
            ds = rasterio.open(uri, "r", sharing=False)
            while len(self.files) >= OPEN_FILES:
                self.files.popitem(last=False)[1].close()
        self.files[uri] = ds
        return ds

    def clear(self) -> None:
        while self.files:
            self.files.popitem()[1].close()

    def drop(self, uri: str) -> None:
        ds = self.files.pop(uri, None)
        if ds is not None:
            ds.close()


_FILES = _OpenFiles()


# --------------------------------------------------------------------------- seams


@dataclass(frozen=True)
class Seams:
    """A file's rows and columns either side of each boundary between its internal
    tiles, over the span the region reads (file pixels).

    Bilinear interpolation from a 20 m file needs one source pixel beyond the block on
    each side, and where that pixel lies in the next tile GDAL decodes the whole tile
    for it: with 1024 px tiles a 1024 px block decoded four 20 m tiles where it needed a
    quarter of one (16 times the pixels; 0.86 s of a full-tile block's reads against
    0.16 s). Read once per file before the blocks (``read_seams``), the pixels past the
    seam come from here and a block decodes only its own tiles.
    """

    tile: tuple[int, int]  # the file's internal tile (rows, cols)
    rows: Mapping[int, npt.NDArray[Any]]  # file row -> its pixels over cols[0]..cols[1]
    cols: Mapping[int, npt.NDArray[Any]]  # file column -> its pixels over rows[0]..rows[1]
    span: tuple[int, int, int, int]  # (row0, row1, col0, col1) the arrays cover

    def covers(self, r0: int, r1: int, c0: int, c1: int) -> bool:
        return self.span[0] <= r0 and r1 <= self.span[1] and self.span[2] <= c0 and c1 <= self.span[3]  # fmt: skip


def _bilinear_window(gy0: int, h: int, gx0: int, w: int, height: int, width: int) -> tuple[int, int, int, int]:  # fmt: skip
    """File rows and columns (r0, r1, c0, c1) that bilinear interpolation from twice the
    grid's pixel reads for grid pixels gy0..gy0+h, gx0..gx0+w (counted from the file's
    corner): each source pixel under one and its neighbours either side."""
    r0, r1 = max((gy0 - 1) // 2, 0), min((gy0 + h - 2) // 2 + 2, height)
    c0, c1 = max((gx0 - 1) // 2, 0), min((gx0 + w - 2) // 2 + 2, width)
    return r0, r1, c0, c1


def _seam_lines(lo: int, hi: int, tile: int) -> list[int]:
    """The lines either side of each tile boundary strictly inside lo..hi."""
    first = (lo // tile + 1) * tile
    return [x for b in range(first, hi, tile) for x in (b - 1, b) if lo <= x < hi]


def read_seams(uri: str, geobox: GeoBox, token: str, gdal_env: Mapping[str, Any]) -> Seams | None:  # fmt: skip
    """``Seams`` of the file at ``uri`` over the part of ``geobox`` it covers; None where
    blocks would not use them (not on the grid at twice its pixel, one tile, a read
    error: the blocks then read the file as before and report any error)."""
    with rasterio.Env(GDAL_CACHEMAX=READ_CACHE_BYTES, **gdal_env):
        try:
            ds = _FILES.get(uri, token)
            grid = _on_grid(ds, geobox)
            if grid is None or grid[0] != 2:
                return None
            th, tw = ds.block_shapes[0]
            _, col, row = grid
            h, w = geobox.shape.yx
            r0, r1, c0, c1 = _bilinear_window(-row, h, -col, w, ds.height, ds.width)
            if r0 >= r1 or c0 >= c1 or (r0 // th == (r1 - 1) // th and c0 // tw == (c1 - 1) // tw):  # fmt: skip
                return None
            rows, cols = _seam_lines(r0, r1, th), _seam_lines(c0, c1, tw)
            got_rows: dict[int, npt.NDArray[Any]] = {}
            parts: dict[int, list[npt.NDArray[Any]]] = {c: [] for c in cols}
            s0 = r0
            while s0 < r1:  # a row of tiles at a time: each tile decoded once
                s1 = min((s0 // th + 1) * th, r1)
                strip = ds.read(1, window=rasterio.windows.Window(c0, s0, c1 - c0, s1 - s0))
                for r in rows:
                    if s0 <= r < s1:
                        got_rows[r] = strip[r - s0].copy()
                for c in cols:
                    parts[c].append(strip[:, c - c0].copy())
                s0 = s1
        except READ_ERRORS:
            _FILES.drop(uri)
            return None
    return Seams((th, tw), got_rows, {c: np.concatenate(p) for c, p in parts.items()}, (r0, r1, c0, c1))  # fmt: skip


def seam_uris(plan: StackPlan) -> list[str]:
    """The files whose seams the blocks would use: bilinear, twice the grid's pixel
    by their STAC metadata (or none given), first band."""
    res = abs(plan.geobox.resolution.x)
    out: dict[str, None] = {}
    for sources in plan.sources:
        for role, src in sources.items():
            if plan.cfg[role].resampling != "bilinear" or src.band != 1:
                continue
            pixel = plan.pixel.get(src.uri)
            if pixel is not None and abs(pixel / res - 2) > 1e-9:
                continue
            out[src.uri] = None
    return list(out)


def with_seams(plan: StackPlan, client: Client | None, progress: Callable[[str], None]) -> StackPlan:  # fmt: skip
    """``plan`` with the seams of its 20 m files, read on the cluster, one task per file."""
    uris = seam_uris(plan)
    if not uris:
        return plan
    t = time.perf_counter()
    args = (plan.geobox, plan.token, plan.gdal_env)
    if client is None:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(os.cpu_count() or 2) as pool:
            got = list(pool.map(lambda u: read_seams(u, *args), uris))
    else:
        futures = client.map(read_seams, uris, *[[a] * len(uris) for a in args], pure=False)
        got = client.gather(futures)
    seams = {u: s for u, s in zip(uris, got, strict=True) if s is not None}
    if seams:
        progress(
            f"composite: read the tile seams of {len(seams)} files at twice the grid's pixel "
            f"in {time.perf_counter() - t:.1f} s, so each block decodes only its own tiles"
        )
    return dataclasses.replace(plan, seams=seams)


# --------------------------------------------------------------------------- reads


def _on_grid(ds: Any, geobox: GeoBox) -> tuple[int, int, int] | None:
    """(k, column, row) when the file's pixel is k grid pixels and its corner lies on
    grid pixel (column, row) of ``geobox``; None when it is not on the grid."""
    sa, da = ds.transform, geobox.affine
    if ds.crs is None or ds.crs != rasterio.crs.CRS.from_user_input(str(geobox.crs)):
        return None
    if sa.b or sa.d or da.b or da.d or da.a <= 0 or da.e >= 0:
        return None
    k = sa.a / da.a
    if abs(k - round(k)) > 1e-9 or round(k) < 1 or abs(sa.e / da.e - k) > 1e-9:
        return None
    col, row = (sa.c - da.c) / da.a, (sa.f - da.f) / da.e
    if abs(col - round(col)) > 1e-6 or abs(row - round(row)) > 1e-6:
        return None
    return round(k), round(col), round(row)


def _halves(x: npt.NDArray[np.int32], axis: int, first: int, n: int) -> npt.NDArray[np.int32]:
    """Along ``axis`` (0 or 1) of ``x`` (a source with a one-pixel border, twice as
    coarse as the grid): the weighted pairs of bilinear interpolation, in quarters, for
    grid pixels ``first`` .. ``first + n`` counted from the border's first grid pixel.
    Grid pixel 2m lies a quarter source pixel before centre m (weights 1 and 3 on m - 1
    and m), grid pixel 2m + 1 a quarter after it (3 and 1 on m and m + 1). Only the
    source lines those pixels need are read, and the output keeps ``x``'s layout."""
    s0 = first // 2
    s1 = (first + n - 1) // 2 + 3  # grid pixel g needs source lines g // 2 .. g // 2 + 2
    f = first - 2 * s0
    if axis == 0:
        x = x[s0:s1]
        three = x[1:-1] * 3
        out = np.empty((2 * (x.shape[0] - 2), x.shape[1]), np.int32)
        np.add(three, x[:-2], out=out[0::2])
        np.add(three, x[2:], out=out[1::2])
        return out[f : f + n]
    x = x[:, s0:s1]
    three = x[:, 1:-1] * 3
    out = np.empty((x.shape[0], 2 * (x.shape[1] - 2)), np.int32)
    np.add(three, x[:, :-2], out=out[:, 0::2])
    np.add(three, x[:, 2:], out=out[:, 1::2])
    return out[:, f : f + n]


#: Grid rows ``_bilinear2`` brings at a time: their int32 temporaries (a few hundred KiB
#: for a 1024 px block) stay in the CPU's cache; whole blocks at once went to memory
#: and back for every pass, 7x slower (docs/performance.md).
BILINEAR_ROWS = 64


def _bilinear2(
    a: npt.NDArray[Any], valid: npt.NDArray[np.bool_], r0: int, c0: int,
    gy0: int, h: int, gx0: int, w: int, nodata: float, dtype: Any,
) -> npt.NDArray[Any]:  # fmt: skip
    """GDAL's bilinear warp kernel (``GWKBilinearResample4Sample``) for a source twice
    as coarse as the grid, in exact integer arithmetic: each value is the weighted mean
    of the valid ones of its four neighbours (weights 9, 3, 3, 1 sixteenths; nodata
    left out and the rest renormalised), rounded half up; no value where the nearest
    neighbour (weight 9) is nodata. GDAL's doubles are exact here (sixteenths of
    integers), and a renormalised mean is never within a rounding error of a half, so
    the numbers are GDAL's to the bit. ``a`` is the source from row ``r0 - 1`` and
    column ``c0 - 1`` with a nodata border of one pixel (``valid`` False there).
    Computed ``BILINEAR_ROWS`` grid rows at a time (each pixel's value is its own)."""
    fy, fx = gy0 - 2 * r0, gx0 - 2 * c0  # the block's first pixel past the border's
    whole = bool(valid[1:-1, 1:-1].all())
    inside = fy > 0 and fx > 0 and fy + h < 2 * (a.shape[0] - 2) and fx + w < 2 * (a.shape[1] - 2)  # fmt: skip
    # the nearest neighbour of grid pixel g is source g // 2, line g // 2 + 1 of ``a``
    near_cols = np.arange(fx, fx + w) // 2 + 1
    out = np.empty((h, w), dtype)
    for s in range(0, h, BILINEAR_ROWS):
        n = min(BILINEAR_ROWS, h - s)
        s0, s1 = (fy + s) // 2, (fy + s + n - 1) // 2 + 3
        first = fy + s - 2 * s0
        vals = a[s0:s1].astype(np.int32)
        ok = valid[s0:s1]
        if not whole:
            vals[~ok] = 0
        acc = _halves(_halves(vals, 0, first, n), 1, fx, w)
        if whole and inside:  # every neighbour valid: floor(acc/16 + 1/2)
            acc += 8
            acc >>= 4
            out[s : s + n] = acc
            continue
        div = _halves(_halves(ok.astype(np.int32), 0, first, n), 1, fx, w)
        near = ok.take(np.arange(first, first + n) // 2 + 1, axis=0).take(near_cols, axis=1)
        strip = out[s : s + n]
        strip.fill(nodata)
        full = near & (div == 16)
        strip[full] = ((acc[full] + 8) >> 4).astype(dtype)
        part = near & (div > 0) & (div != 16)
        # floor(acc / div + 1/2) in integers where some neighbour is nodata
        strip[part] = ((2 * acc[part] + div[part]) // (2 * div[part])).astype(dtype)
    return out


def _as_loaded(pix: npt.NDArray[Any], dtype: Any, src_nodata: float, dst_nodata: float) -> npt.NDArray[Any]:  # fmt: skip
    """File pixels in the load's dtype, the file's nodata as the load's (odc-loader's
    remapping after a paste)."""
    if pix.dtype == dtype and src_nodata == dst_nodata:
        return pix
    bad = pix == src_nodata
    out = pix.astype(dtype)
    out[bad] = dst_nodata
    return out


def _trim(seams: Seams | None, r0: int, r1: int, c0: int, c1: int) -> tuple[int, int, int, int]:
    """The part of file window r0..r1, c0..c1 to decode: without a first or last line
    that lies alone past a tile boundary, where ``seams`` hold it."""
    ra, rb, ca, cb = r0, r1, c0, c1
    if seams is not None and seams.covers(r0, r1, c0, c1):
        th, tw = seams.tile
        if rb - ra > 1 and ra % th == th - 1 and ra in seams.rows:
            ra += 1
        if rb - ra > 1 and (rb - 1) % th == 0 and rb - 1 in seams.rows:
            rb -= 1
        if cb - ca > 1 and ca % tw == tw - 1 and ca in seams.cols:
            ca += 1
        if cb - ca > 1 and (cb - 1) % tw == 0 and cb - 1 in seams.cols:
            cb -= 1
    return ra, rb, ca, cb


class _Prefetched(threading.local):
    """Windows of files decoded once for a group of blocks (``composite_group``), by
    dataset name: (row, col, pixels)."""

    def __init__(self) -> None:
        self.windows: dict[str, tuple[int, int, npt.NDArray[Any]]] = {}


_PREFETCHED = _Prefetched()


def _read(ds: Any, r0: int, r1: int, c0: int, c1: int) -> npt.NDArray[Any]:
    """File rows r0..r1, columns c0..c1 of band 1: from the group's prefetched window
    of the file when it holds them, else decoded."""
    got = _PREFETCHED.windows.get(ds.name)
    if got is not None:
        pr, pc, pix = got
        if pr <= r0 and r1 <= pr + pix.shape[0] and pc <= c0 and c1 <= pc + pix.shape[1]:
            return pix[r0 - pr : r1 - pr, c0 - pc : c1 - pc]
    out: npt.NDArray[Any] = ds.read(1, window=rasterio.windows.Window(c0, r0, c1 - c0, r1 - r0))
    return out


def _read_seamed(
    ds: Any, seams: Seams | None, r0: int, r1: int, c0: int, c1: int, out: npt.NDArray[Any]
) -> None:
    """File rows r0..r1, columns c0..c1 into ``out``: a first or last line that lies
    alone past a tile boundary comes from ``seams`` (when they cover the window), so
    only the tiles of the rest are decoded."""
    ra, rb, ca, cb = _trim(seams, r0, r1, c0, c1)
    if seams is not None:
        s = seams.span
        for r in [r0] * (ra > r0) + [r1 - 1] * (rb < r1):
            out[r - r0] = seams.rows[r][c0 - s[2] : c1 - s[2]]
        for c in [c0] * (ca > c0) + [c1 - 1] * (cb < c1):
            out[:, c - c0] = seams.cols[c][r0 - s[0] : r1 - s[0]]
    out[ra - r0 : rb - r0, ca - c0 : cb - c0] = _read(ds, ra, rb, ca, cb)


def _clipped(ds: Any, geobox: GeoBox, k: int, col: int, row: int) -> tuple[tuple[slice, slice], int, int, int, int] | None:  # fmt: skip
    """The block's pixels whose centre lies in the file (GDAL writes only those): (roi,
    gy0, gx0, h, w), gy0 and gx0 the first one's on the grid of the file's corner; None
    when there are none."""
    h, w = geobox.shape.yx
    gy0, gx0 = -row, -col  # the block's first pixel on the grid of the file's corner
    y0, y1 = max(0, -gy0), min(h, ds.height * k - gy0)
    x0, x1 = max(0, -gx0), min(w, ds.width * k - gx0)
    if y0 >= y1 or x0 >= x1:
        return None
    return (slice(y0, y1), slice(x0, x1)), gy0 + y0, gx0 + x0, y1 - y0, x1 - x0


def _file_window(ds: Any, geobox: GeoBox, cfg: Any, grid: tuple[int, int, int], seams: Seams | None) -> tuple[int, int, int, int] | None:  # fmt: skip
    """The file window (r0, r1, c0, c1) that ``_fast_read`` decodes for ``geobox`` from
    a file coarser than the grid (None for others, or none of it on the geobox)."""
    k, col, row = grid
    clip = _clipped(ds, geobox, k, col, row) if k > 1 else None
    if clip is None or cfg.resampling not in ("nearest", "bilinear"):
        return None
    _, gy0, gx0, h, w = clip
    if cfg.resampling == "nearest":
        return gy0 // k, (gy0 + h - 1) // k + 1, gx0 // k, (gx0 + w - 1) // k + 1
    if k != 2:
        return None
    return _trim(seams, *_bilinear_window(gy0, h, gx0, w, ds.height, ds.width))


def _fast_applies(ds: Any, cfg: Any, k: int) -> tuple[np.dtype[Any], float, float] | None:
    """(dtype, file nodata, load nodata) where ``_fast_read`` reads a file whose pixel is
    ``k`` grid pixels; None where odc-loader's reader must (no nodata to mirror, float
    pixels, a resampling other than nearest and bilinear, bilinear from other than
    twice the grid's pixel)."""
    from odc.loader._reader import resolve_dst_nodata, resolve_src_nodata

    dtype = np.dtype(cfg.dtype) if cfg.dtype else np.dtype(ds.dtypes[0])
    src_nodata = resolve_src_nodata(ds.nodatavals[0], cfg)
    dst_nodata = resolve_dst_nodata(dtype, cfg, src_nodata)
    if src_nodata is None or dst_nodata is None:
        return None
    if not (cfg.resampling == "nearest" or k == 1 or (cfg.resampling == "bilinear" and k == 2)):
        return None
    if np.dtype(ds.dtypes[0]).kind not in "ui" or dtype.kind not in "ui":
        return None
    return dtype, src_nodata, dst_nodata


def _fast_read(
    ds: Any, geobox: GeoBox, cfg: Any, grid: tuple[int, int, int], seams: Seams | None = None
) -> tuple[tuple[slice, slice], npt.NDArray[Any]] | None:
    """The file on the block (roi, pixels) without GDAL's warper; None where this does
    not apply (no nodata to mirror, a resampling other than nearest and bilinear, or
    bilinear from other than twice the grid's pixel). ``seams``: the file's
    (``read_seams``), for bilinear reads past its tile boundaries."""
    k, col, row = grid
    applies = _fast_applies(ds, cfg, k)
    if applies is None:
        return None
    dtype, src_nodata, dst_nodata = applies
    bilinear = cfg.resampling == "bilinear" and k > 1
    clip = _clipped(ds, geobox, k, col, row)
    if clip is None:
        return (slice(0, 0), slice(0, 0)), np.empty((0, 0), dtype)
    roi, gy0, gx0, h, w = clip
    if k == 1:
        pix = ds.read(1, window=rasterio.windows.Window(gx0, gy0, w, h))
        return roi, _as_loaded(pix, dtype, src_nodata, dst_nodata)
    if not bilinear:  # nearest: the source pixel under each centre (never on an edge)
        r0, r1 = gy0 // k, (gy0 + h - 1) // k + 1
        c0, c1 = gx0 // k, (gx0 + w - 1) // k + 1
        raw = _read(ds, r0, r1, c0, c1)
        iy = np.arange(gy0, gy0 + h) // k - r0
        ix = np.arange(gx0, gx0 + w) // k - c0
        pix = raw.take(iy, axis=0).take(ix, axis=1)
        return roi, _as_loaded(pix, dtype, src_nodata, dst_nodata)
    # bilinear, k == 2: the source rows and columns either neighbour may be, in the file
    r0, r1, c0, c1 = _bilinear_window(gy0, h, gx0, w, ds.height, ds.width)
    a = np.zeros((r1 - r0 + 2, c1 - c0 + 2), np.dtype(ds.dtypes[0]))
    _read_seamed(ds, seams, r0, r1, c0, c1, a[1:-1, 1:-1])
    valid = np.zeros(a.shape, bool)
    valid[1:-1, 1:-1] = a[1:-1, 1:-1] != src_nodata
    return roi, _bilinear2(a, valid, r0, c0, gy0, h, gx0, w, dst_nodata, dtype)


def read_onto(
    src: Any, cfg: Any, geobox: GeoBox, dst: npt.NDArray[Any], failures: list[str], token: str,
    seams: Seams | None = None, fresh: bool = False,
) -> bool:  # fmt: skip
    """One band file onto a block: its pixels fill ``dst`` where it is still nodata
    (odc-loader's fuser); True if it wrote any. ``seams``: the file's, if read
    (``read_seams``). ``fresh``: nothing is in ``dst`` yet, so the pixels are copied
    without the test (the same result)."""
    from odc.loader._rio import rio_read  # 0.75 s to import: workers preload it

    uri = src.uri
    try:
        ds = _FILES.get(uri, token)
        grid = _on_grid(ds, geobox) if src.band == 1 else None
        got = _fast_read(ds, geobox, cfg, grid, seams) if grid is not None else None
        if got is None:
            got = rio_read(src, cfg, geobox)
    except READ_ERRORS as e:
        _FILES.drop(uri)
        failures.append(f"Ignoring read failure reading {uri}:{src.band} (reason: '{e}')")
        return False
    roi, pix = got
    if pix.size == 0:
        return False
    part = dst[roi]
    if fresh:
        part[...] = pix
    else:
        fill = cfg.fill_value if cfg.fill_value is not None else 0
        np.copyto(part, pix, where=part == fill)
    return True


def read_block(plan: StackPlan, iy: int, ix: int) -> tuple[dict[str, npt.NDArray[Any]], list[str]]:  # fmt: skip
    """The (time, y, x) stack of every role on block (iy, ix), and the read failures."""
    gb = plan.block_geobox(iy, ix)
    h, w = gb.shape.yx
    stacks: dict[str, npt.NDArray[Any]] = {}
    for role in plan.roles:
        c = plan.cfg[role]
        fill = c.fill_value if c.fill_value is not None else 0
        stacks[role] = np.full((len(plan.groups), h, w), fill, dtype=np.dtype(c.dtype))
    failures: list[str] = []
    with rasterio.Env(GDAL_CACHEMAX=READ_CACHE_BYTES, **plan.gdal_env):
        for t, group in enumerate(plan.groups):
            fresh = set(plan.roles)  # the observation's slices nothing has written to
            for i in group:
                if (iy, ix) not in plan.touches[i]:
                    continue
                for role in plan.roles:
                    src = plan.sources[i].get(role)
                    if src is not None and read_onto(
                        src, plan.cfg[role], gb, stacks[role][t], failures, plan.token,
                        plan.seams.get(src.uri), role in fresh,
                    ):  # fmt: skip
                        fresh.discard(role)
    return stacks, failures


def composite_task(
    plan: StackPlan, iy: int, ix: int
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32] | None, list[str]]:
    """Block (iy, ix) of the composite, read and reduced in one task; its overview level
    1 (``reduce_average``, where ``plan.halves``), so the writer does not read the
    composite back for it; and its read failures."""
    stacks, failures = read_block(plan, iy, ix)
    bands = [stacks[role] for role in BAND_ROLES.values()]
    if plan.s2cloudless:
        bands += [stacks[role] for role in L1C_ROLES]
    block = composite_block(
        stacks["scl"], *bands, observations=plan.observations, s2cloudless=plan.s2cloudless
    )
    del stacks, bands  # level 1's temporaries (about 90 bytes a pixel) replace the inputs
    return block, reduce_average(block) if plan.halves else None, failures


def block_groups(plan: StackPlan, lanes: int) -> list[tuple[tuple[int, int], ...]]:
    """The plan's blocks in groups of 2 x 2 (``composite_group``), or one by one where
    that would leave fewer than two groups for each of ``lanes`` worker threads. Groups
    start after a thin first row or column of blocks, where the scenes' tiles start."""
    ny, nx = len(plan.rows) - 1, len(plan.cols) - 1

    def key(i: int, edges: tuple[int, ...], n: int) -> int:
        thin = n > 2 and edges[1] - edges[0] < edges[2] - edges[1]
        return 0 if thin and i == 0 else (i - thin) // 2 + thin

    groups: dict[tuple[int, int], list[tuple[int, int]]] = collections.defaultdict(list)
    for iy, ix in plan.blocks:
        groups[(key(iy, plan.rows, ny), key(ix, plan.cols, nx))].append((iy, ix))
    if len(groups) < 2 * lanes:
        return [(b,) for b in plan.blocks]
    return [tuple(g) for g in groups.values()]


def _prefetch(plan: StackPlan, blocks: Sequence[tuple[int, int]]) -> dict[str, tuple[int, int, npt.NDArray[Any]]]:  # fmt: skip
    """The windows the group's blocks read from files coarser than the grid (the 20 m
    bands and SCL), each decoded once: a 20 m tile serves four 1024 px blocks, and
    block by block GDAL decoded it four times."""
    r0 = min(plan.rows[iy] for iy, _ in blocks)
    r1 = max(plan.rows[iy + 1] for iy, _ in blocks)
    c0 = min(plan.cols[ix] for _, ix in blocks)
    c1 = max(plan.cols[ix + 1] for _, ix in blocks)
    gb = plan.geobox[r0:r1, c0:c1]
    out: dict[str, tuple[int, int, npt.NDArray[Any]]] = {}
    for sources, touches in zip(plan.sources, plan.touches, strict=True):
        if not any(b in touches for b in blocks):
            continue
        for role, src in sources.items():
            cfg = plan.cfg[role]
            try:
                ds = _FILES.get(src.uri, plan.token)
                grid = _on_grid(ds, gb) if src.band == 1 else None
                if grid is None or grid[0] == 1 or _fast_applies(ds, cfg, grid[0]) is None:
                    continue
                win = _file_window(ds, gb, cfg, grid, plan.seams.get(src.uri))
                if win is not None and ds.name not in out:
                    out[ds.name] = (win[0], win[2], _read(ds, *win))
            except READ_ERRORS:
                _FILES.drop(src.uri)  # the block reads meet the error again and report it
    return out


def composite_group(
    plan: StackPlan, blocks: Sequence[tuple[int, int]]
) -> list[tuple[npt.NDArray[np.float32], npt.NDArray[np.float32] | None, list[str]]]:
    """``composite_task`` for each of ``blocks`` (``block_groups``), in one task that
    decodes the coarser files' windows once for all of them (``_prefetch``)."""
    with rasterio.Env(GDAL_CACHEMAX=READ_CACHE_BYTES, **plan.gdal_env):
        _PREFETCHED.windows = _prefetch(plan, blocks) if len(blocks) > 1 else {}
    try:
        return [composite_task(plan, iy, ix) for iy, ix in blocks]
    finally:
        _PREFETCHED.windows = {}
