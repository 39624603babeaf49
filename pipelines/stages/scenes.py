"""The scenes stage: search, normalise and store a region's scenes for one period.

Input: a STAC API URL, a region and a period. Output: a stac-geoparquet file at
``<data root>/scenes/<region>/<period>.parquet`` (normalised items, one per scene,
twins dropped), which the ``scenes`` view of the DuckDB catalog reads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.infra.layout import scenes_path
from pipelines.regions import Period, Region
from pipelines.stages.stac.geoparquet import write_geoparquet
from pipelines.stages.stac.search import SearchResult, search_scenes


@dataclass(frozen=True)
class ScenesOutput:
    path: Path | None  # None when the period has no usable scene
    result: SearchResult

    @property
    def count(self) -> int:
        return len(self.result.scenes)

    def summary(self) -> dict[str, Any]:
        r = self.result
        return {
            "scene_count": self.count,
            "returned": r.returned,
            "dropped": len(r.dropped),
            "too_cloudy": r.too_cloudy,
            "server_filter": r.server_filter,
            "cloud_cover": r.cloud_stats,
            "tiles": sorted({s.mgrs_tile for s in r.scenes}),
            "dates": [s.datetime.date().isoformat() for s in r.scenes],
            "baselines": sorted({s.processing_baseline for s in r.scenes}),
            "l1c_twins": sum(1 for s in r.scenes if s.l1c_assets),
            "l1c_unmatched": list(r.l1c_unmatched),
            "path": str(self.path) if self.path else None,
        }


def relative_hrefs(item: dict[str, Any], root: Path, target: Path) -> dict[str, Any]:
    """The item with ``file://`` hrefs inside the data root made relative to ``target``.

    The embedded world's COGs live under the data root; stored relative to the scenes
    file (as STAC reads relative hrefs), a moved or copied data root reads its own
    copies, never the original's. ``read_scene_items`` resolves them again.
    """
    import os
    from urllib.parse import unquote, urlsplit

    base = root.resolve()
    assets = {}
    for key, asset in item["assets"].items():
        href = asset["href"]
        if href.startswith("file://"):
            path = Path(unquote(urlsplit(href).path))
            if path.is_relative_to(base):
                href = Path(os.path.relpath(path, target.parent.resolve())).as_posix()
        assets[key] = {**asset, "href": href}
    return {**item, "assets": assets}


def write_scenes(
    result: SearchResult, region: Region, period: Period, root: Path, api_url: str | None = None
) -> ScenesOutput:
    """Store the normalised scenes atomically; an empty period removes a stale file.

    Items keep their provider's links; an item with a ``collection`` but no collection
    link (a provider that leaves links out) gets one to ``api_url``'s collection, as
    the STAC item schema requires."""
    target = scenes_path(root, region.id, period.id)
    if not result.scenes:
        # The search succeeded and found nothing: the partition is truly empty now.
        target.unlink(missing_ok=True)
        return ScenesOutput(path=None, result=result)
    items = [
        relative_hrefs(
            s.to_item({"asmwatch:region": region.id, "asmwatch:period": period.id}), root, target
        )
        for s in result.scenes
    ]
    if api_url is not None:
        items = [with_collection_link(item, api_url) for item in items]
    write_geoparquet(items, target)
    return ScenesOutput(path=target, result=result)


def find_scenes(
    url: str, region: Region, period: Period, root: Path, progress: Callable[[str], None]
) -> ScenesOutput:
    """Search ``url`` and store what it finds: the whole stage in one call."""
    result = search_scenes(url, region, period, progress=progress)
    return write_scenes(result, region, period, root, api_url=url)


def with_collection_link(item: dict[str, Any], api_url: str) -> dict[str, Any]:
    """``item`` with a ``collection`` link to ``api_url`` when it names a collection
    and has none."""
    collection = item.get("collection")
    links = list(item.get("links") or [])
    if not collection or any(link.get("rel") == "collection" for link in links):
        return item
    href = f"{api_url.rstrip('/')}/collections/{collection}"
    return {**item, "links": [*links, {"rel": "collection", "href": href, "type": "application/json"}]}  # fmt: skip
