"""The embedded source: build a region's simulated world once, then serve it over STAC.

Used wherever a region says ``source: embedded``. The world lives under
``<data root>/embedded/<region>/`` and is rebuilt only when the region's embedded spec,
AOI or periods change (its ``world.json`` records a hash of them).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

from pipelines.embedded.server import EmbeddedStacServer
from pipelines.embedded.simulator import load_items, simulate_world, spec_hash
from pipelines.regions import Region
from pipelines.stages.stac.geoparquet import write_geoparquet

log = logging.getLogger(__name__)


def world_dir(root: Path, region: Region) -> Path:
    return root / "embedded" / region.id


def ensure_world(root: Path, region: Region, say: Callable[[str], None] = log.info) -> Path:
    """The region's embedded world, simulated now if missing or out of date."""
    if region.source != "embedded":
        raise ValueError(f"region {region.id!r} has source {region.source!r}, not 'embedded'")
    out = world_dir(root, region)
    want = spec_hash(region)
    meta = out / "world.json"
    if meta.exists():
        try:
            if json.loads(meta.read_text()).get("spec_hash") == want:
                return out
        except json.JSONDecodeError:
            pass
        say(f"embedded world for {region.id} is out of date; rebuilding")
    say(f"simulating the embedded Sentinel-2 world for {region.id} into {out}")
    info = simulate_world(region, out, progress=say)
    say(f"simulated {len(info.items)} scenes on MGRS tile {info.mgrs_tile} (EPSG:{info.epsg})")
    return out


def context_path(root: Path, region: Region, kind: str) -> Path | None:
    """Resolve a region's context layer path (``embedded:`` paths point into its world)."""
    raw = region.context.get(kind)
    if raw is None:
        return None
    if raw.startswith("embedded:"):
        return world_dir(root, region) / raw.removeprefix("embedded:")
    return Path(raw)


def start_server(
    root: Path,
    region: Region,
    say: Callable[[str], None] = log.info,
    startup_timeout_s: float = 60.0,
) -> EmbeddedStacServer:
    """Start a STAC API over the region's world; the caller stops it."""
    world = ensure_world(root, region, say)
    serve_dir = root / "embedded" / ".serve" / region.id
    geoparquet = write_geoparquet(load_items(world), serve_dir / "items.parquet")
    server = EmbeddedStacServer(geoparquet, serve_dir, startup_timeout_s=startup_timeout_s)
    server.start()
    say(f"embedded STAC API for {region.id} answering on {server.url}")
    return server
