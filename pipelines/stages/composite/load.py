"""Load: the scenes onto the region's grid with odc-stac, as dask arrays; how large a
block each task can take in a worker's memory.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import rasterio
import rasterio.features
import rasterio.windows

from pipelines.stages.composite.inputs import (
    DEFAULT_CHUNK,
    GROUP_PROPERTY,
    L1C_ROLES,
    LOAD_ROLES,
    REMOTE_GDAL,
    _href_path,
    _is_local,
    aws_signed,
)

if TYPE_CHECKING:
    import xarray as xr
    from distributed import Client
    from odc.geo.geobox import GeoBox


log = logging.getLogger(__name__)
# odc-loader warps 20 m bands into bare numpy buffers; GDAL then notes, harmlessly, that
# the in-memory destination has no geotransform of its own.
warnings.filterwarnings(
    "ignore", category=rasterio.errors.NotGeoreferencedWarning, module="rasterio.warp"
)

# --------------------------------------------------------------------------- load


def stac_items(items: Sequence[Mapping[str, Any]]) -> list[Any]:
    """pystac Items for odc-stac. rasterio does not percent-decode file:// URLs (a data
    root with '+' or a space would not open): local files become plain paths."""
    import pystac

    out = []
    for raw in items:
        assets = {
            k: {**a, "href": _href_path(a["href"])} if _is_local(a["href"]) else a
            for k, a in raw["assets"].items()
        }
        item = pystac.Item.from_dict({**raw, "assets": assets}, preserve_dict=True)
        item.clear_links("self")
        out.append(item)
    return out


def load_stack(
    items: Sequence[Mapping[str, Any]],
    geobox: GeoBox,
    *,
    chunk: int = DEFAULT_CHUNK,
    resampling: str = "bilinear",
    s2cloudless: bool = False,
) -> xr.Dataset:
    """Lazy (time, y, x) DN stack of the reflectance roles and SCL on ``geobox``.

    ``items`` must be tagged by ``plan_observations``; each time step is one observation.
    Read errors become nodata (``fail_on_error=False``) and are logged by odc-loader;
    ``build_composite`` collects those messages.
    """
    import odc.stac

    if any(not _is_local(a["href"]) for raw in items for a in raw["assets"].values()):
        # Remote COGs (Earth Search on S3 over https, a blob store): GDAL settings for
        # range reads (no directory listing, retries; S3 unsigned unless the environment
        # has credentials). odc-stac captures them into the graph, so dask workers
        # elsewhere read with them too.
        aws = None if aws_signed() else {"aws_unsigned": True}
        odc.stac.configure_rio(cloud_defaults=True, aws=aws, **REMOTE_GDAL)  # type: ignore[arg-type]
    if s2cloudless:
        # odc-stac takes the band list from the first item: start with one that has
        # an L1C twin (grouping and fusing order do not depend on this order).
        items = sorted(items, key=lambda i: L1C_ROLES[0] not in i["assets"])
    return odc.stac.load(
        stac_items(items),
        bands=[*LOAD_ROLES, *(L1C_ROLES if s2cloudless else ())],
        geobox=geobox,
        groupby=GROUP_PROPERTY,
        chunks={"time": 1, "y": chunk, "x": chunk},
        resampling={"scl": "nearest", "*": resampling},
        fail_on_error=False,
    )


def task_bytes(chunk: int, observations: int, s2cloudless: bool = False) -> int:
    """Estimated peak bytes of one block task (``read.composite_task``) on a ``chunk``-px
    block.

    Per pixel: the 7 input stacks (uint16/uint8, counted at 2 bytes), the median's working
    copy of one band, clear and valid masks; the 10 float32 outputs with their
    temporaries; and the reader's integer temporaries for one file (24 bytes). Blocks
    run in groups of four (``read.composite_group``): the group's 20 m windows (B11,
    B12 and SCL, as many pixels as one block has) and the other three blocks' results
    with their overview level 1 (150 bytes).
    """
    stacks = 7 + (len(L1C_ROLES) if s2cloudless else 0)
    # s2cloudless adds its float32 TOA copy at 1/16 of the pixels, and its mask.
    extra = (len(L1C_ROLES) * 4 // 16 + 1) if s2cloudless else 0
    group = 5 * observations + 3 * (10 * 4 + 10)
    per_pixel = observations * (stacks * 2 + 2 + 1 + 1 + extra) + 10 * 4 * 2 + 24 + group
    return chunk * chunk * per_pixel


def safe_chunk(
    requested: int,
    observations: int,
    worker_memory: int | None,
    threads: int = 1,
    s2cloudless: bool = False,
) -> int:
    """The largest chunk up to ``requested`` whose tasks fit in half the worker's memory.

    The other half is headroom for the load tasks of the next blocks, GDAL's cache and
    the worker itself. Never below 128 px (tiny blocks would drown in overhead).
    """
    if not worker_memory:
        return requested
    budget = worker_memory // 2 // max(1, threads)
    chunk = requested
    while chunk > 128 and task_bytes(chunk, observations, s2cloudless) > budget:
        chunk //= 2
    return max(chunk, 128) if requested >= 128 else requested


def _cluster_memory(client: Client) -> tuple[int | None, int]:
    workers = client.scheduler_info().get("workers", {}).values()
    limits = [int(w.get("memory_limit") or 0) for w in workers]
    threads = [int(w.get("nthreads") or 1) for w in workers]
    positive = [m for m in limits if m > 0]
    return (min(positive) if positive else None), (max(threads) if threads else 1)
