"""Write: the blocks computed on the cluster and written into a COG with overviews, the
statistics gathered on the way, and the stage end to end (``build_composite``,
``composite_for_region``).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import rasterio
import rasterio.features
import rasterio.windows

from pipelines.infra.layout import composite_path
from pipelines.infra.progress import Progress
from pipelines.infra.tiling import reduce_average, staged_cog, staged_cog_levels
from pipelines.stages.composite.inputs import (
    BAND_DESCRIPTIONS,
    CLOUD_MASKS,
    COUNT_BAND,
    DEFAULT_CHUNK,
    DEFAULT_RESOLUTION,
    L1C_ROLES,
    MASKED_SCL,
    OUTPUT_BANDS,
    REFLECTANCE_BANDS,
    CompositeError,
    CompositeResult,
    _check_l1c,
    aoi_mask,
    check_scene_files,
    plan_observations,
    read_scene_items,
    redact,
    region_geobox,
)
from pipelines.stages.composite.load import _cluster_memory, safe_chunk, task_bytes
from pipelines.stages.composite.read import (
    StackPlan,
    block_groups,
    composite_group,
    plan_stack,
    with_seams,
)
from pipelines.stages.stac.signing import signed_item, signer_for

if TYPE_CHECKING:
    from distributed import Client
    from odc.geo.geobox import GeoBox

    from pipelines.regions import Period, Region

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- write


#: Blocks are not split below this size for idle threads (a block's files are opened once
#: per worker, so smaller blocks cost little more than their edges).
MIN_SPLIT = 256


def split_chunk(chunk: int, shape: tuple[int, int], lanes: int) -> int:
    """``chunk`` halved (not below ``MIN_SPLIT``) until a grid of ``shape`` has at least
    two blocks per worker thread: a small region is not left to one worker. The
    composite does not depend on the block size."""
    h, w = shape
    while chunk // 2 >= MIN_SPLIT and math.ceil(h / chunk) * math.ceil(w / chunk) < 2 * lanes:
        chunk //= 2
    return chunk


#: (window, block, its overview level 1 or None) as the writer takes them.
Blocks = Iterator[tuple[rasterio.windows.Window, npt.NDArray[np.float32], npt.NDArray[np.float32] | None]]  # fmt: skip


def compute_plan(
    plan: StackPlan,
    failures: list[str],
    client: Client | None = None,
    in_flight: int | None = None,
    progress: Callable[[str], None] = log.info,
) -> Blocks:
    """Yield (window, block, level 1) as the blocks' tasks (``read.composite_task``: read
    and reduce) finish, keeping a bounded number in flight; their read failures are
    appended to ``failures`` (redacted). The 20 m files' tile seams are read first
    (``read.with_seams``), and blocks go to the workers in groups of 2 x 2 that decode
    the coarser files once (``read.block_groups``, ``read.composite_group``)."""

    def window(iy: int, ix: int) -> rasterio.windows.Window:
        r0, r1, c0, c1 = plan.span(iy, ix)
        return rasterio.windows.Window(c0, r0, c1 - c0, r1 - r0)

    def take(msgs: list[str]) -> None:
        for m in map(redact, msgs):
            if m not in failures:
                failures.append(m)

    plan = with_seams(plan, client, progress)
    lanes = sum(client.nthreads().values()) if client is not None else (os.cpu_count() or 2)
    groups = block_groups(plan, lanes)
    if len(groups) < len(plan.blocks):
        progress(
            f"composite: {len(groups)} tasks of up to 2 x 2 blocks, each decoding the 20 m "
            "files' tiles once for its blocks"
        )
    if client is None:
        from concurrent.futures import ThreadPoolExecutor

        n = in_flight or lanes
        with ThreadPoolExecutor(n) as pool:
            for i in range(0, len(groups), n):
                batch = groups[i : i + n]
                for group, results in zip(batch, pool.map(lambda g: composite_group(plan, g), batch), strict=True):  # fmt: skip
                    for (iy, ix), (block, half, msgs) in zip(group, results, strict=True):
                        take(msgs)
                        yield window(iy, ix), block, half
        return

    from pipelines.infra.tiling import as_finished

    [shared] = client.scatter([plan], broadcast=True, hash=False)
    try:
        start = lambda g: client.submit(composite_group, shared, g, pure=False)  # noqa: E731
        for group, results in as_finished(client, groups, start, in_flight):
            for (iy, ix), (block, half, msgs) in zip(group, results, strict=True):
                take(msgs)
                yield window(iy, ix), block, half
    finally:
        shared.release()


@dataclass
class _Stats:
    aoi_pixels: int = 0
    valid_pixels: int = 0
    histogram: dict[int, int] = field(default_factory=dict)
    band_sums: dict[str, float] = field(default_factory=dict)
    band_counts: dict[str, int] = field(default_factory=dict)

    def add(self, block: npt.NDArray[np.float32], inside: npt.NDArray[np.bool_]) -> None:
        # On the client, for every block: counted without sorting (bincount, not
        # unique) and each band masked once, half the time of doing otherwise.
        count = block[len(REFLECTANCE_BANDS)][inside]
        self.aoi_pixels += int(count.size)
        self.valid_pixels += int(np.count_nonzero(count > 0))
        freq = np.bincount(count.astype(np.int64))
        for v in np.flatnonzero(freq).tolist():
            self.histogram[v] = self.histogram.get(v, 0) + int(freq[v])
        for i, name in enumerate(OUTPUT_BANDS):
            if name == COUNT_BAND:
                continue
            ok = np.isfinite(block[i])
            ok &= inside
            self.band_sums[name] = self.band_sums.get(name, 0.0) + float(block[i][ok].sum())
            self.band_counts[name] = self.band_counts.get(name, 0) + int(np.count_nonzero(ok))

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
    blocks: Blocks,
    geobox: GeoBox,
    target: Path,
    *,
    n_blocks: int,
    aoi: Mapping[str, Any] | None,
    tags: Mapping[str, str],
    halves: bool,
    progress: Callable[[str], None] = log.info,
) -> _Stats:
    """Stream blocks into a tiled GTiff, then copy it to a COG with overviews, atomically.
    ``halves``: every block comes with its overview level 1 (``StackPlan.halves``), which
    is written as it comes and halved into the other levels; else the levels are halved
    from the stage once it is written."""
    stats = _Stats()
    h, w = geobox.shape.yx
    profile = {
        "width": w, "height": h, "count": len(OUTPUT_BANDS), "dtype": "float32",
        "crs": str(geobox.crs), "transform": geobox.affine, "nodata": float("nan"),
        "predictor": 3,
    }  # fmt: skip
    # Blocks arrive in any order, which the COG layout cannot take: staged_cog_levels
    # stages a tiled GTiff and its level 1 beside the target, halves level 1 into the
    # other levels, then GDAL's COG driver lays them out.
    with ExitStack() as files:
        if halves:
            dst, level1 = files.enter_context(staged_cog_levels(target, profile, progress=progress))  # fmt: skip
        else:
            dst, level1 = files.enter_context(staged_cog(target, profile, progress=progress)), None  # fmt: skip
        for i, name in enumerate(OUTPUT_BANDS, start=1):
            dst.set_band_description(i, name)
            dst.update_tags(i, description=BAND_DESCRIPTIONS[name])
        report = Progress("composite", n_blocks, progress, unit="blocks written")
        for done, (win, block, half) in enumerate(blocks, start=1):
            dst.write(block, window=win)
            if level1 is not None:
                if half is None or win.col_off % 2 or win.row_off % 2:
                    raise ValueError(f"composite block {win} came without its overview level 1")
                level1.write(half, window=rasterio.windows.Window(win.col_off // 2, win.row_off // 2, half.shape[2], half.shape[1]))  # fmt: skip
            inside = (
                aoi_mask(aoi, geobox, win)
                if aoi is not None
                else np.ones(block.shape[1:], dtype=bool)
            )
            stats.add(block, inside)
            report(done)
        dst.update_tags(**tags)
    return stats


def _empty_blocks(geobox: GeoBox, chunk: int) -> Blocks:
    h, w = geobox.shape.yx
    for y0 in range(0, h, chunk):
        for x0 in range(0, w, chunk):
            bh, bw = min(chunk, h - y0), min(chunk, w - x0)
            block = np.full((len(OUTPUT_BANDS), bh, bw), np.nan, dtype=np.float32)
            block[len(REFLECTANCE_BANDS)] = 0
            half = reduce_average(block) if chunk % 2 == 0 else None
            yield rasterio.windows.Window(x0, y0, bw, bh), block, half


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
    failures: list[str] = []
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
            n_blocks=n_ch, aoi=aoi, tags=tags, halves=chunk % 2 == 0, progress=progress,
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
        lanes = sum(client.nthreads().values()) if client is not None else (os.cpu_count() or 1)
        split = split_chunk(chunk, geobox.shape.yx, lanes)
        if split != chunk:
            progress(
                f"composite: {n_ch} block(s) of {chunk} px would leave some of the "
                f"{lanes} worker threads idle; using blocks of up to {split} px"
            )
            chunk = split
        plan = plan_stack(
            tagged, observations, geobox, chunk=chunk, resampling=resampling, s2cloudless=s2c
        )
        n_ch = len(plan.blocks)
        aligned = (
            f" (edges on the scenes' internal tiles: first at row {plan.rows[1]}, column "
            f"{plan.cols[1]})"
            if any(len(e) > 2 and e[1] != chunk for e in (plan.rows, plan.cols))
            else ""
        )
        progress(
            f"composite: {len(ok)} scenes in {len(observations)} observations onto "
            f"{geobox.shape.x}x{geobox.shape.y} px ({geobox.crs}, {geobox.resolution.x:g} m), "
            f"{n_ch} blocks of up to {chunk} px{aligned}, each read and reduced on a worker"
        )
        stats = write_composite(
            compute_plan(plan, failures, client, progress=progress), geobox, target,
            n_blocks=n_ch, aoi=aoi, tags=tags, halves=plan.halves, progress=progress,
        )  # fmt: skip
        for msg in failures:
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
        read_failures=list(failures),
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
    from pipelines.infra.layout import scenes_path

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
