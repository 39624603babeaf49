"""One tiling for every raster stage: processing tiles, their halos, where they run, and
how their results reach a COG.

A region's raster (its UTM grid at 10 m) is cut into square processing tiles of
``size`` px, counted from the raster's upper-left corner, so their edges fall on the
512 px blocks of the composite and probability COGs (``size`` is a multiple or a divisor
of 512). A tile owns its ``core``; stages that need context read ``core`` plus a halo,
clipped to the raster (a tile on the raster's edge is smaller, never padded into the
output). Halos by stage:

- ``mining_probability``: the inference windows of the whole-raster plan
  (``ml.infer.plan_tiles``) that overlap the core: every output pixel is the same
  blended sum of the same windows as whole-raster inference, whatever the tile size;
- ``asm_sites``: ``SITES_HALO`` px, more than the opening + closing reach (4 px);
  components that cross a tile's edge are merged afterwards (``pipelines.stages.sites``);
- training reads chips and pixel samples as windows, never a composite whole.

Tiles run as dask tasks when a client is given (``run_tiles``: a bounded number in
flight, results handed back as they finish, a dead worker's tiles re-run elsewhere by
dask), else one after another in this process. Results are written into a staged tiled
GTiff beside the target; its overview levels are written block by block beside it, and
GDAL's COG driver lays both out into the target at the end, atomically (``staged_cog``):
a failure leaves the previous file, never a half-written one, and no stage grows in
memory with the raster.

``DEFAULT_TILE`` (1024 px, 1 Mpx) gives a region of a few Mpx enough tiles to keep two
workers busy and keeps a CPU probability task under about 1.4 GiB (bench/scale.py); a
905 Mpx region is about 860 tiles, whose per-task overhead is small. ``tile_px`` in the
``settings`` resource changes it for every stage.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from xml.etree import ElementTree

import numpy as np
import numpy.typing as npt
import rasterio
import rasterio.shutil
import rasterio.windows
from rasterio._err import CPLE_BaseError  # GDAL's errors, raised as they come

from pipelines.infra.errors import first_line
from pipelines.infra.progress import duration
from pipelines.infra.storage import atomic_path, raise_if_full, remove_orphans

if TYPE_CHECKING:
    from distributed import Client

BLOCK = 512  # internal block edge of the composite and probability COGs
DEFAULT_TILE = 1024  # processing tile edge, px (CPU; CUDA inference: detection.GPU_TILE)
MIN_TILE = 64


class TilingError(ValueError):
    """A tile size that cannot cut the grid; the message says which sizes can."""


class TileReadError(RuntimeError):
    """A tile's window could not be read: names the file and the window."""


def check_tile_size(size: int) -> int:
    """``size`` if it is a usable tile edge (aligned to the 512 px COG blocks)."""
    if not isinstance(size, int) or size < MIN_TILE or (size % BLOCK and BLOCK % size):
        raise TilingError(
            f"tile size {size!r} px: use a multiple of {BLOCK} (512, 1024, 2048, ...) or a "
            f"divisor of it of at least {MIN_TILE} (64, 128, 256), so tiles line up with "
            "the COG blocks"
        )
    return size


@dataclass(frozen=True)
class Span:
    """Half-open pixel ranges of rows and columns: [row0, row1) x [col0, col1)."""

    row0: int
    row1: int
    col0: int
    col1: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.row1 - self.row0, self.col1 - self.col0

    @property
    def window(self) -> rasterio.windows.Window:
        return rasterio.windows.Window(self.col0, self.row0, *self.shape[::-1])

    def within(self, outer: Span) -> tuple[slice, slice]:
        """Slices that cut this span out of an array holding ``outer``."""
        return (
            slice(self.row0 - outer.row0, self.row1 - outer.row0),
            slice(self.col0 - outer.col0, self.col1 - outer.col0),
        )

    def describe(self) -> str:
        return (
            f"rows {self.row0}-{self.row1}, cols {self.col0}-{self.col1} "
            f"(row offset {self.row0}, col offset {self.col0}, {self.shape[0]} x {self.shape[1]} px)"
        )


@dataclass(frozen=True)
class Tile:
    """One processing tile: its place in the tile grid, the pixels it owns, and what it
    reads (the core plus the halo, clipped to the raster)."""

    row: int
    col: int
    core: Span
    read: Span

    @property
    def key(self) -> str:
        return f"r{self.row}c{self.col}"


@dataclass(frozen=True)
class Tiling:
    """Square tiles of ``size`` px over a ``height`` x ``width`` raster."""

    height: int
    width: int
    size: int = DEFAULT_TILE
    halo: int = 0

    def __post_init__(self) -> None:
        check_tile_size(self.size)
        if self.height <= 0 or self.width <= 0:
            raise TilingError(f"cannot tile an empty raster ({self.height} x {self.width} px)")
        if self.halo < 0:
            raise TilingError(f"halo must be >= 0 px, got {self.halo}")

    @property
    def rows(self) -> int:
        return math.ceil(self.height / self.size)

    @property
    def cols(self) -> int:
        return math.ceil(self.width / self.size)

    @property
    def n_tiles(self) -> int:
        return self.rows * self.cols

    def tile(self, row: int, col: int) -> Tile:
        r0, c0 = row * self.size, col * self.size
        core = Span(r0, min(r0 + self.size, self.height), c0, min(c0 + self.size, self.width))
        h = self.halo
        read = Span(
            max(0, core.row0 - h), min(self.height, core.row1 + h),
            max(0, core.col0 - h), min(self.width, core.col1 + h),
        )  # fmt: skip
        return Tile(row, col, core, read)

    def tiles(self) -> list[Tile]:
        return [self.tile(r, c) for r in range(self.rows) for c in range(self.cols)]

    def describe(self) -> str:
        return (
            f"{self.n_tiles} tile(s) of up to {self.size} x {self.size} px "
            f"({self.rows} x {self.cols}) over {self.height} x {self.width} px"
            + (f", halo {self.halo} px" if self.halo else "")
        )


def read_window(src: Any, indexes: Any, span: Span, path: Path | str, **kw: Any) -> Any:
    """``src.read(indexes, window=span)``; a failure names the file and the window."""
    try:
        return src.read(indexes, window=span.window, **kw)
    except (rasterio.errors.RasterioError, CPLE_BaseError) as e:
        raise TileReadError(
            f"{path}: cannot read {span.describe()} ({first_line(e).rstrip('.')})"
        ) from e


# --------------------------------------------------------------------------- running


def resolve_client(client: Any, n_tiles: int) -> Client | None:
    """The dask client for ``n_tiles`` tiles: ``client`` itself, or, when it is a
    factory (the ``dask`` resource's ``client``), the one it starts, only for more than
    one tile: a single tile runs in this process, without starting a cluster."""
    if client is None or not callable(client):
        return client
    return client() if n_tiles > 1 else None


def in_dask_worker() -> bool:
    """Whether this code runs as a task on a dask worker."""
    try:
        from distributed import get_worker

        get_worker()
        return True
    except (ImportError, ValueError):
        return False


def worker_threads() -> int:
    """Threads this process may use: the dask worker's share, else every core."""
    if in_dask_worker():
        from distributed import get_worker

        return max(1, int(get_worker().state.nthreads))
    return os.cpu_count() or 1


def gpu_workers(client: Client) -> bool:
    """Whether the cluster's workers advertise a ``GPU`` resource."""
    workers = client.scheduler_info().get("workers", {}).values()
    return any(float((w.get("resources") or {}).get("GPU", 0)) > 0 for w in workers)


def run_tiles(
    fn: Callable[..., Any],
    tiles: Sequence[Tile],
    *args: Any,
    client: Client | None = None,
    resources: dict[str, float] | None = None,
    in_flight: int | None = None,
    name: str = "tile",
) -> Iterator[tuple[Tile, Any]]:
    """``fn(tile, *args)`` for every tile, yielding (tile, result) as each finishes.

    With a dask ``client`` each tile is one task (``resources`` such as ``{"GPU": 1}``
    pin it to workers that have them), with at most ``in_flight`` results held at once;
    without, tiles run here in order. A worker that dies mid-task has its tiles re-run
    on another worker by the scheduler; an exception in ``fn`` ends the run.
    """
    if client is None:
        for tile in tiles:
            yield tile, fn(tile, *args)
        return
    token = os.urandom(4).hex()

    def start(tile: Tile) -> Any:
        key = f"{name}-{tile.key}-{token}"
        return client.submit(fn, tile, *args, key=key, resources=resources, pure=False)

    yield from as_finished(client, tiles, start, in_flight)


#: Environment of the worker processes a LocalCluster spawns, beside dask's own
#: (``distributed.nanny.pre-spawn-environ``). Dask sets ``MALLOC_TRIM_THRESHOLD_`` so
#: that workers give freed memory back; glibc then stops adapting its mmap threshold,
#: every array over 128 KiB is mapped and unmapped anew, and the U-Net's tiles ran 24 %
#: slower (bench/scale.py). glibc's adaptive ceiling, 32 MiB, restores the speed and
#: keeps the trimming. Workers of an external cluster should set it too.
WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": 32 * 2**20}
#: Modules a LocalCluster's workers import as they start (``distributed.worker.preload``)
#: rather than in their first task: odc-loader alone takes 0.75 s to import, which a
#: small region's composite would otherwise wait for on every worker.
WORKER_PRELOAD = ["odc.loader._rio", "pipelines.stages.composite.read"]


@contextmanager
def worker_environ() -> Iterator[None]:
    """Dask config under which a LocalCluster's workers start with ``WORKER_ENV``,
    ``WORKER_PRELOAD`` imported."""
    import dask

    with dask.config.set(
        {f"distributed.nanny.pre-spawn-environ.{k}": v for k, v in WORKER_ENV.items()}
        | {"distributed.worker.preload": WORKER_PRELOAD}
    ):
        yield


def as_finished(
    client: Client, items: Iterable[Any], start: Callable[[Any], Any], in_flight: int | None = None
) -> Iterator[tuple[Any, Any]]:
    """(item, result) for each item as its future finishes, ``start(item)`` making the
    future, with at most ``in_flight`` (default: twice the cluster's threads) unfinished
    or unread at once: results stream through the client's memory, never pile up."""
    from distributed import as_completed

    n = in_flight or max(2, 2 * sum(client.nthreads().values()))
    pending = iter(items)
    by_key: dict[Any, Any] = {}

    def submit() -> Any:
        item = next(pending, None)
        if item is None:
            return None
        fut = start(item)
        by_key[fut.key] = item
        return fut

    queue = as_completed([f for f in (submit() for _ in range(n)) if f is not None])
    try:
        for fut in queue:
            result = fut.result()
            item = by_key.pop(fut.key)
            fut.release()
            nxt = submit()
            if nxt is not None:
                queue.add(nxt)
            yield item, result
    finally:
        for fut in list(queue.futures):
            fut.cancel()


# --------------------------------------------------------------------------- writing


def overview_levels(height: int, width: int, smallest: int = 128) -> int:
    """Halvings until the smaller side is at most ``smallest`` px (GDAL's AUTO stops at
    the block size, which leaves a small AOI without any overview)."""
    levels, side = 0, min(height, width)
    while side > smallest:
        side = (side + 1) // 2
        levels += 1
    return levels


#: GDAL's block cache while a stage is written, its overviews computed and the COG laid
#: out (bytes). GDAL's default is 5 % of the machine's memory (1.2 GiB of a 24 GiB
#: machine, 6.4 GiB of a 128 GiB one), and a stage's dirty blocks fill it: a bound keeps
#: a stage's memory independent of the host. Every block is written once and read once
#: in each step, so a small cache costs little time. A 71 Mpx 10-band composite's
#: overviews and layout (2 cores): 64 MiB 22 s + 40 s, peak 0.77 GiB; 128 MiB 19 s +
#: 32 s, 0.88 GiB; 256 MiB 26 s + 41 s, 1.11 GiB.
STAGE_CACHE_BYTES = 128 * 2**20

#: Creation options of the files a stage writes on its way to a COG (the stage, its
#: overview levels): written once, read once and deleted, so not compressed. zstd level
#: 1 (used before) saved 15 % of the scratch disk on a 16 Mpx 10-band float32 composite
#: (542 against 640 MiB) but reading it back took 2.3 s against 0.6 s, and the COG
#: layout from it 2.77 s against 2.47 s (docs/performance.md); deflate was slower
#: still. The COG itself is deflated, which every reader has.
SCRATCH_TIFF = {
    "driver": "GTiff", "tiled": True, "blockxsize": BLOCK, "blockysize": BLOCK,
    "compress": "none", "predictor": 1, "num_threads": "ALL_CPUS", "BIGTIFF": "IF_SAFER",
}  # fmt: skip


@contextmanager
def gdal_cache(limit: int) -> Iterator[None]:
    """GDAL's block cache at most ``limit`` bytes meanwhile (rasterio hands
    ``GDAL_CACHEMAX`` to ``GDALSetCacheMax64``, process-wide), then as it was.

    Through a ``rasterio.Env``: set bare with ``set_gdal_config``, GDAL's read errors
    were then logged with their whole URLs, SAS tokens included
    (tests/pipelines/stages/test_signing.py).
    """
    from rasterio.env import get_gdal_config

    before = get_gdal_config("GDAL_CACHEMAX")
    with rasterio.Env(GDAL_CACHEMAX=min(int(before), limit) if before else limit):
        yield


def reduce_average(block: npt.NDArray[np.floating[Any]]) -> npt.NDArray[np.floating[Any]]:
    """One overview step of a ``(bands, rows, cols)`` float block: the mean of each 2 x 2
    group of pixels, NaN (nodata) left out, NaN where all four are; an odd last row or
    column averages what it has (GDAL's ``AVERAGE``, its sizes rounded up)."""
    h, w = block.shape[1:]
    if h % 2 or w % 2:
        block = np.pad(block, ((0, 0), (0, h % 2), (0, w % 2)), constant_values=np.nan)
    # Pairs of rows, then pairs of columns, in float64: a pair of float32 values sums
    # exactly, and the float32 result was the same as ``sum(axis=(2, 4))``'s on blocks
    # of values from 1e-8 to 1e3 with NaN holes, at 2.5x its speed (0.06 s against
    # 0.15 s for a 10-band 1 Mpx block).
    nan = np.isnan(block)
    z = np.where(nan, block.dtype.type(0), block)
    total = z[:, 0::2].astype(np.float64)
    total += z[:, 1::2]
    total = total[:, :, 0::2] + total[:, :, 1::2]
    n = (~nan[:, 0::2]).view(np.uint8) + (~nan[:, 1::2]).view(np.uint8)
    n = n[:, :, 0::2] + n[:, :, 1::2]
    with np.errstate(invalid="ignore", divide="ignore"):
        return (total / n).astype(block.dtype)  # 0 / 0: NaN where all four are


def check_averageable(path: Path, profile: dict[str, Any]) -> None:
    """Refuse, naming ``path``, a raster ``reduce_average`` would average wrongly: not
    float, or with a nodata other than NaN."""
    nodata = profile.get("nodata")
    if not np.issubdtype(np.dtype(profile["dtype"]), np.floating) or not (
        nodata is None or math.isnan(nodata)
    ):
        raise ValueError(
            f"{path}: average overviews need a float raster with NaN for nodata, not "
            f"{profile['dtype']} with nodata {nodata} (staged_cog's gdal_overviews computes "
            "others)"
        )


def level_profile(profile: Mapping[str, Any], height: int, width: int, transform: Any) -> dict[str, Any]:  # fmt: skip
    """The profile of the overview level below a raster of ``height`` x ``width`` px
    at ``transform``: half its size (rounded up), twice its pixel, a scratch GTiff."""
    return {
        **profile, **SCRATCH_TIFF,
        "height": (height + 1) // 2, "width": (width + 1) // 2,
        "transform": transform * rasterio.Affine.scale(2),
    }  # fmt: skip


def write_overviews(
    source: Path, levels: int, name: Callable[[int], Path], first: Path | None = None
) -> list[Path]:
    """Overview levels 1..``levels`` of ``source`` (a tiled float GTiff, nodata NaN), each
    a tiled GTiff at ``name(k)`` halved from the level before, ``BLOCK`` px at a time.
    ``first``: level 1, already written (``staged_cog_levels``); the rest are halved
    from it.

    Memory is one window of the level above (2 x ``BLOCK`` a side, every band) and GDAL's
    block cache, whatever the raster's size; GDAL's COG driver then only lays the levels
    out (``OVERVIEWS=FORCE_USE_EXISTING``). GDAL building them itself held up to 2.15 GiB
    for a 71 Mpx 10-band composite and took 168 s (docs/performance.md).
    """
    with rasterio.open(source) as src:
        profile = {**src.profile, **SCRATCH_TIFF}
    check_averageable(source, profile)
    written: list[Path] = [] if first is None else [first]
    above = source if first is None else first
    for k in range(len(written) + 1, levels + 1):
        with rasterio.open(above, num_threads="ALL_CPUS") as src:  # decode on every core
            level = level_profile(profile, src.height, src.width, src.transform)
            h, w = level["height"], level["width"]
            written.append(name(k))
            with rasterio.open(written[-1], "w", **level) as dst:
                for row in range(0, h, BLOCK):
                    for col in range(0, w, BLOCK):
                        span = Span(
                            2 * row, min(2 * (row + BLOCK), src.height),
                            2 * col, min(2 * (col + BLOCK), src.width),
                        )  # fmt: skip
                        part = reduce_average(read_window(src, None, span, above))
                        r, c = part.shape[1:]
                        dst.write(part, window=Span(row, row + r, col, col + c).window)
        above = written[-1]
    return written[:levels]


def with_overviews(source: Path, levels: Sequence[Path], vrt: Path) -> Path:
    """A VRT of ``source`` (its bands, nodata, descriptions and tags, as GDAL copies them)
    whose bands list ``levels`` as their overviews, for GDAL's COG driver to lay out."""
    # GDAL deletes an existing VRT's files (its overviews too) before writing over it.
    vrt.unlink(missing_ok=True)
    rasterio.shutil.copy(source, vrt, driver="VRT")
    tree = ElementTree.parse(vrt)
    for band in tree.getroot().iter("VRTRasterBand"):
        for level in levels:
            ovr = ElementTree.SubElement(band, "Overview")
            ElementTree.SubElement(ovr, "SourceFilename", relativeToVRT="0").text = str(level)
            ElementTree.SubElement(ovr, "SourceBand").text = band.get("band")
    tree.write(vrt)
    return vrt


@contextmanager
def _staged(
    target: Path,
    profile: dict[str, Any],
    gdal_overviews: str | None,
    cog_options: dict[str, Any] | None,
    progress: Callable[[str], None] | None,
    halves: bool,
) -> Iterator[tuple[Any, Any]]:
    say = progress or (lambda _m: None)
    label = "/".join(target.parts[-3:])  # composite/<region>/<period>.tif
    h, w = int(profile["height"]), int(profile["width"])
    stage_profile = {**profile, **SCRATCH_TIFF}
    for k in ("blocksize", "overview_resampling"):
        stage_profile.pop(k, None)
    # ZSTD at level 1 with the floating-point predictor: on real reflectance it compresses
    # the same as DEFLATE level 1, in half the CPU, and reads back twice as fast; GDAL has
    # read it since 2.3, Debian's 3.6 (QGIS's) included (docs/performance.md).
    options: dict[str, Any] = {
        "COMPRESS": "ZSTD", "LEVEL": 1, "PREDICTOR": "YES", "BLOCKSIZE": BLOCK,
        "BIGTIFF": "IF_SAFER", "NUM_THREADS": "ALL_CPUS",
    }  # fmt: skip
    if gdal_overviews is None:
        check_averageable(target, profile)
        options["OVERVIEWS"] = "FORCE_USE_EXISTING"
    else:
        options |= {"OVERVIEW_RESAMPLING": gdal_overviews, "OVERVIEW_COUNT": overview_levels(h, w)}
    options |= cog_options or {}
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(target.parent, target.stem)  # stages of runs killed mid-write
    scratch = f".{target.stem}.{os.getpid()}"
    stage = target.with_name(f"{scratch}.stage.tif")
    vrt = target.with_name(f"{scratch}.stage.vrt")
    try:
        with gdal_cache(STAGE_CACHE_BYTES):
            level = lambda k: target.with_name(f"{scratch}.ovr{k}.tif")  # noqa: E731
            n = overview_levels(h, w)
            first = level(1) if halves and n else None
            with ExitStack() as files:
                dst = files.enter_context(rasterio.open(stage, "w", **stage_profile))
                half = None
                if first is not None:
                    lp = level_profile(profile, h, w, profile["transform"])
                    half = files.enter_context(rasterio.open(first, "w", **lp))
                yield dst, half
            source = stage
            if gdal_overviews is None:
                t = time.monotonic()
                if first is None:
                    say(f"{label}: writing {n} overview levels")
                else:
                    rest = {1: "", 2: "; halving it into level 2"}.get(n, f"; halving it into levels 2-{n}")  # fmt: skip
                    say(f"{label}: overview level 1 came with the blocks{rest}")
                levels = write_overviews(stage, n, level, first=first)
                source = with_overviews(stage, levels, vrt)
                say(f"{label}: {n} overview levels ready in {duration(time.monotonic() - t)}")
            t = time.monotonic()
            with atomic_path(target) as tmp:
                rasterio.shutil.copy(
                    source, tmp, driver="COG", **{k: v for k, v in options.items() if v is not None}
                )
            say(f"{label}: laid out as a COG in {duration(time.monotonic() - t)}")
    except Exception as e:
        raise_if_full(target, e)  # GDAL may only say "Write error", or nothing at all
        raise
    finally:
        for p in (stage, vrt, *target.parent.glob(f"{scratch}.ovr*.tif")):
            p.unlink(missing_ok=True)


@contextmanager
def staged_cog(
    target: Path,
    profile: dict[str, Any],
    *,
    gdal_overviews: str | None = None,
    cog_options: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> Iterator[Any]:
    """A writable tiled GTiff for blocks in any order, becoming ``target`` as a COG.

    The staged file lies beside the target (``.<stem>.<pid>.stage.tif``). On success its
    overview levels (average, NaN left out) are written beside it block by block
    (``write_overviews``), and GDAL's COG driver lays stage and levels out into a
    temporary file that replaces the target atomically. ``gdal_overviews`` (a GDAL
    resampling, e.g. ``"NEAREST"``) has the COG driver compute the overviews instead,
    for rasters that are not float or not averaged (the simulator's bands). Any failure
    removes the stage and keeps the old target. ``cog_options`` override the COG driver's
    creation options (None drops one). GDAL's block cache is bounded at
    ``STAGE_CACHE_BYTES`` meanwhile. ``progress`` hears of the overviews and the layout,
    which take about as long as the blocks of a composite.
    """
    with _staged(target, profile, gdal_overviews, cog_options, progress, halves=False) as (dst, _):
        yield dst


@contextmanager
def staged_cog_levels(
    target: Path, profile: dict[str, Any], *, progress: Callable[[str], None] | None = None
) -> Iterator[tuple[Any, Any]]:
    """``staged_cog`` for a writer that also brings overview level 1: yields the stage and
    the level-1 GTiff (half the size, ``reduce_average`` of the stage; None for a raster
    too small for overviews), each written window by window. The writer must fill every
    window of both; levels 2.. are halved from level 1, so the stage is not read back
    for overviews. A composite's blocks come with their level 1 from the workers
    (``pipelines.stages.composite.read.composite_task``)."""
    with _staged(target, profile, None, None, progress, halves=True) as pair:
        yield pair
