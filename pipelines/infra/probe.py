"""Probe a region's STAC source before the first run: can it be searched, and can its
scenes' pixels be read from here? (``asmwatch probe``.)

It searches one period as the ``scenes`` asset would, then opens the clearest scenes'
bands as the composite would (signed for Planetary Computer, with the remote GDAL
settings) and reads each band's last block. Nothing is written under the data root,
except the embedded world an embedded region is served from. Its timings (search, and
opening each scene's bands) are a first look at the latencies a live run will see.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pipelines.regions import Period, Region
from pipelines.stages.composite import LOAD_ROLES, check_scene_files
from pipelines.stages.stac.search import SearchResult, search_scenes
from pipelines.stages.stac.signing import signed_item, signer_for


@dataclass
class SceneProbe:
    id: str
    cloud_cover: float | None
    seconds: float
    problem: str | None  # None: every band opened and its last block read


@dataclass
class ProbeReport:
    url: str
    region: str
    period: str
    search_s: float
    search: SearchResult
    scenes: list[SceneProbe] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.search.scenes) and all(s.problem is None for s in self.scenes)

    def lines(self) -> list[str]:
        s = self.search
        tiles = sorted({sc.mgrs_tile for sc in s.scenes})
        out = [
            f"probe {self.region} {self.period} at {self.url}",
            f"  search: {s.returned} item(s) returned, {len(s.scenes)} scene(s) kept "
            f"({s.too_cloudy} too cloudy, {len(s.dropped)} dropped), {self.search_s:.1f} s, "
            f"server-side filter: {'yes' if s.server_filter else 'no'}",
        ]
        if tiles:
            out.append(f"  tiles: {', '.join(tiles)}")
        if self.scenes:
            out.append(
                f"  read check of the {len(self.scenes)} clearest scene(s) "
                f"({len(LOAD_ROLES)} bands each: open, read the last block):"
            )
        for p in self.scenes:
            cc = f"{p.cloud_cover:.1f} %" if p.cloud_cover is not None else "? %"
            verdict = "OK" if p.problem is None else f"UNREADABLE: {p.problem}"
            out.append(f"    {p.id}  cloud {cc}  {p.seconds:.2f} s  {verdict}")
        if not s.scenes:
            out.append(f"FAILED: no scenes for {self.region} in {self.period} at {self.url}")
        elif self.ok:
            out.append(f"OK: {self.region} can be materialised from {self.url} (no table or composite was written)")  # fmt: skip
        else:
            out.append(f"FAILED: some scenes of {self.region} cannot be read from here")
        return out


def probe(
    url: str,
    region: Region,
    period: Period,
    *,
    scenes: int = 2,
    pc_subscription_key: str | None = None,
    progress: Callable[[str], None] = lambda _m: None,
) -> ProbeReport:
    """Search ``url`` for the region's period and read-check the ``scenes`` clearest.

    Raises ``StacSearchError`` when the API cannot be searched and ``SigningError`` when
    Planetary Computer tokens cannot be had; an unreadable scene is reported, not raised.
    """
    t = time.perf_counter()
    found = search_scenes(url, region, period, progress=progress)
    report = ProbeReport(url, region.id, period.id, time.perf_counter() - t, found)
    clearest = sorted(
        found.scenes, key=lambda s: (s.cloud_cover is None, s.cloud_cover or 0.0, s.id)
    )[: max(0, scenes)]
    items = [s.to_item() for s in clearest]
    sign = signer_for(items, pc_subscription_key)
    for scene, item in zip(clearest, items, strict=True):
        if sign is not None:
            item = signed_item(item, sign)
        t = time.perf_counter()
        _, skipped = check_scene_files([item], workers=len(LOAD_ROLES))
        report.scenes.append(
            SceneProbe(
                scene.id,
                scene.cloud_cover,
                time.perf_counter() - t,
                skipped[0].reason if skipped else None,
            )
        )
        progress(f"probe: {scene.id} {'read' if not skipped else 'unreadable'} in {report.scenes[-1].seconds:.2f} s")  # fmt: skip
    return report
