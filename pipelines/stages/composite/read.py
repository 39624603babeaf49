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
import threading
import uuid
from collections.abc import Mapping, Sequence
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
    return StackPlan(
        geobox=geobox, rows=rows, cols=cols, roles=roles, cfg=cfg, groups=groups, sources=sources,
        touches=tuple(touches), gdal_env=remote_gdal() if remote else {}, observations=tuple(observations),
        s2cloudless=s2cloudless, token=uuid.uuid4().hex,
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
    """Along ``axis`` of ``x`` (a source with a one-pixel border, twice as coarse as the
    grid): the weighted pairs of bilinear interpolation, in quarters, for grid pixels
    ``first`` .. ``first + n`` counted from the border's first grid pixel. Grid
    pixel 2m lies a quarter source pixel before centre m (weights 1 and 3 on m - 1 and
    m), grid pixel 2m + 1 a quarter after it (3 and 1 on m and m + 1)."""
    x = np.moveaxis(x, axis, 0)
    three = 3 * x[1:-1]
    out = np.empty((2 * (x.shape[0] - 2), *x.shape[1:]), np.int32)
    np.add(three, x[:-2], out=out[0::2])
    np.add(three, x[2:], out=out[1::2])
    return np.moveaxis(out[first : first + n], 0, axis)


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
    column ``c0 - 1`` with a nodata border of one pixel (``valid`` False there)."""
    fy, fx = gy0 - 2 * r0, gx0 - 2 * c0  # the block's first pixel past the border's
    vals = a.astype(np.int32)
    whole = bool(valid[1:-1, 1:-1].all())
    if not whole:
        vals[~valid] = 0
    acc = _halves(_halves(vals, 0, fy, h), 1, fx, w)
    if whole and fy > 0 and fx > 0 and fy + h < 2 * (a.shape[0] - 2) and fx + w < 2 * (a.shape[1] - 2):  # fmt: skip
        return ((acc + 8) >> 4).astype(dtype)  # every neighbour valid: floor(acc/16 + 1/2)
    div = _halves(_halves(valid.astype(np.int32), 0, fy, h), 1, fx, w)
    inner = valid[1:-1, 1:-1]  # the nearest neighbour of grid pixel g is source g // 2
    near = inner.repeat(2, axis=0)[fy : fy + h].repeat(2, axis=1)[:, fx : fx + w]
    out = np.full((h, w), nodata, dtype)
    full = near & (div == 16)
    out[full] = ((acc[full] + 8) >> 4).astype(dtype)
    part = near & (div > 0) & (div != 16)
    # floor(acc / div + 1/2) in integers where some neighbour is nodata
    out[part] = ((2 * acc[part] + div[part]) // (2 * div[part])).astype(dtype)
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


def _fast_read(
    ds: Any, geobox: GeoBox, cfg: Any, grid: tuple[int, int, int]
) -> tuple[tuple[slice, slice], npt.NDArray[Any]] | None:
    """The file on the block (roi, pixels) without GDAL's warper; None where this does
    not apply (no nodata to mirror, a resampling other than nearest and bilinear, or
    bilinear from other than twice the grid's pixel)."""
    from odc.loader._reader import resolve_dst_nodata, resolve_src_nodata

    k, col, row = grid
    dtype = np.dtype(cfg.dtype) if cfg.dtype else np.dtype(ds.dtypes[0])
    src_nodata = resolve_src_nodata(ds.nodatavals[0], cfg)
    dst_nodata = resolve_dst_nodata(dtype, cfg, src_nodata)
    bilinear = cfg.resampling == "bilinear" and k > 1
    if src_nodata is None or dst_nodata is None:
        return None
    if not (cfg.resampling == "nearest" or k == 1 or (bilinear and k == 2)):
        return None
    if np.dtype(ds.dtypes[0]).kind not in "ui" or dtype.kind not in "ui":
        return None
    h, w = geobox.shape.yx
    gy0, gx0 = -row, -col  # the block's first pixel on the grid of the file's corner
    # Grid pixels whose centre lies in the file: GDAL writes only those.
    y0, y1 = max(0, -gy0), min(h, ds.height * k - gy0)
    x0, x1 = max(0, -gx0), min(w, ds.width * k - gx0)
    empty = ((slice(0, 0), slice(0, 0)), np.empty((0, 0), dtype))
    if y0 >= y1 or x0 >= x1:
        return empty
    gy0, gx0, h, w = gy0 + y0, gx0 + x0, y1 - y0, x1 - x0
    roi = (slice(y0, y1), slice(x0, x1))
    if k == 1:
        pix = ds.read(1, window=rasterio.windows.Window(gx0, gy0, w, h))
        return roi, _as_loaded(pix, dtype, src_nodata, dst_nodata)
    if not bilinear:  # nearest: the source pixel under each centre (never on an edge)
        r0, r1 = gy0 // k, (gy0 + h - 1) // k + 1
        c0, c1 = gx0 // k, (gx0 + w - 1) // k + 1
        raw = ds.read(1, window=rasterio.windows.Window(c0, r0, c1 - c0, r1 - r0))
        iy = np.arange(gy0, gy0 + h) // k - r0
        ix = np.arange(gx0, gx0 + w) // k - c0
        pix = raw.take(iy, axis=0).take(ix, axis=1)
        return roi, _as_loaded(pix, dtype, src_nodata, dst_nodata)
    # bilinear, k == 2: the source rows and columns either neighbour may be, in the file
    r0, r1 = max((gy0 - 1) // 2, 0), min((gy0 + h - 2) // 2 + 2, ds.height)
    c0, c1 = max((gx0 - 1) // 2, 0), min((gx0 + w - 2) // 2 + 2, ds.width)
    raw = ds.read(1, window=rasterio.windows.Window(c0, r0, c1 - c0, r1 - r0))
    a = np.zeros((raw.shape[0] + 2, raw.shape[1] + 2), raw.dtype)
    a[1:-1, 1:-1] = raw
    valid = np.zeros(a.shape, bool)
    valid[1:-1, 1:-1] = raw != src_nodata
    return roi, _bilinear2(a, valid, r0, c0, gy0, h, gx0, w, dst_nodata, dtype)


def read_onto(
    src: Any, cfg: Any, geobox: GeoBox, dst: npt.NDArray[Any], failures: list[str], token: str
) -> None:
    """One band file onto a block: its pixels fill ``dst`` where it is still nodata
    (odc-loader's fuser)."""
    from odc.loader._rio import rio_read  # 0.75 s to import: workers preload it

    uri = src.uri
    try:
        ds = _FILES.get(uri, token)
        grid = _on_grid(ds, geobox) if src.band == 1 else None
        got = _fast_read(ds, geobox, cfg, grid) if grid is not None else None
        if got is None:
            got = rio_read(src, cfg, geobox)
    except READ_ERRORS as e:
        _FILES.drop(uri)
        failures.append(f"Ignoring read failure reading {uri}:{src.band} (reason: '{e}')")
        return
    roi, pix = got
    if pix.size == 0:
        return
    part = dst[roi]
    fill = cfg.fill_value if cfg.fill_value is not None else 0
    np.copyto(part, pix, where=part == fill)


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
            for i in group:
                if (iy, ix) not in plan.touches[i]:
                    continue
                for role in plan.roles:
                    src = plan.sources[i].get(role)
                    if src is not None:
                        read_onto(src, plan.cfg[role], gb, stacks[role][t], failures, plan.token)
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
