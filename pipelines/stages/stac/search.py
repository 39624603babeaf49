"""Search a STAC API for a region's Sentinel-2 L2A scenes in one period.

First step of the flow. pystac-client talks to Earth Search, Planetary Computer, any
other STAC API and asmwatch's own embedded server the same way. Cloud cover is filtered
on the server with a CQL2 ``filter`` where the server takes one, and always again on the
client (a server that lacks the filter extension, or an item without ``eo:cloud_cover``,
is handled the same way everywhere).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pystac_client
from pystac_client.conformance import ConformanceClasses
from pystac_client.exceptions import APIError
from pystac_client.stac_api_io import StacApiIO
from urllib3.util.retry import Retry

from pipelines.regions import Period, Region
from pipelines.stages.stac.normalize import NormalizeResult, Scene, normalize_items

log = logging.getLogger(__name__)

#: Presets known to accept CQL2 ``filter`` even where their landing page does not say so
#: (Earth Search v1's conformsTo lists only ``query``; its server takes ``filter``).
ACCEPTS_FILTER = {"earth-search", "planetary-computer", "embedded"}
PAGE_SIZE = 100


@dataclass
class SearchResult:
    scenes: list[Scene]
    returned: int  # items the server returned
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (id, reason)
    server_filter: bool = False
    too_cloudy: int = 0
    unknown_cloud: int = 0
    pages_s: float = 0.0
    l1c_unmatched: list[str] = field(default_factory=list)  # L2A ids without an L1C twin

    @property
    def cloud_stats(self) -> dict[str, float]:
        cc = [s.cloud_cover for s in self.scenes if s.cloud_cover is not None]
        if not cc:
            return {}
        cc.sort()
        return {
            "min": round(cc[0], 2),
            "median": round(cc[len(cc) // 2], 2),
            "max": round(cc[-1], 2),
            "mean": round(sum(cc) / len(cc), 2),
        }


class StacSearchError(RuntimeError):
    """The STAC API could not be searched; the message names the URL and the cause."""


#: Transient HTTP answers worth retrying (rate limit, server errors, gateways).
RETRY_STATUSES = (429, 500, 502, 503, 504)


@dataclass(frozen=True)
class RetrySettings:
    """How hard to try each STAC request before the search fails.

    Each request (landing page, every search page) is retried on connection errors,
    read timeouts and the statuses above, ``retries`` times with exponential backoff
    (urllib3's: the first retry at once, then ``backoff_s`` x 2, 4, 8, ... capped at 60 s;
    a Retry-After header is honoured).
    ``ASMWATCH_STAC_RETRIES``, ``ASMWATCH_STAC_BACKOFF_S`` and ``ASMWATCH_STAC_TIMEOUT_S``
    override the defaults.
    """

    retries: int = 5
    backoff_s: float = 1.0
    timeout_s: float = 60.0

    @classmethod
    def from_env(cls) -> RetrySettings:
        d = cls()
        return cls(
            int(os.environ.get("ASMWATCH_STAC_RETRIES", d.retries)),
            float(os.environ.get("ASMWATCH_STAC_BACKOFF_S", d.backoff_s)),
            float(os.environ.get("ASMWATCH_STAC_TIMEOUT_S", d.timeout_s)),
        )

    def stac_io(self) -> StacApiIO:
        retry = Retry(
            total=self.retries, connect=self.retries, read=self.retries, status=self.retries,
            backoff_factor=self.backoff_s, backoff_max=60.0, status_forcelist=RETRY_STATUSES,
            allowed_methods=None,  # searches are POSTs; they only read, so retry them too
            respect_retry_after_header=True, raise_on_status=True,
        )  # fmt: skip
        return StacApiIO(timeout=self.timeout_s, max_retries=retry)


def open_client(
    url: str, *, accepts_filter: bool = False, retry: RetrySettings | None = None
) -> pystac_client.Client:
    retry = retry or RetrySettings.from_env()
    try:
        # open() re-applies its own timeout to the StacApiIO, so pass it here too.
        client = pystac_client.Client.open(url, stac_io=retry.stac_io(), timeout=retry.timeout_s)
    except (APIError, OSError, ValueError) as e:
        raise StacSearchError(f"cannot open STAC API {url}: {_why(e)}") from e
    if not client.conforms_to(ConformanceClasses.ITEM_SEARCH):
        # Legacy servers (Earth Search v0) search fine but do not say so.
        log.warning("%s does not declare item-search conformance; searching anyway", url)
        client.add_conforms_to("ITEM_SEARCH")
    if accepts_filter and not client.conforms_to(ConformanceClasses.FILTER):
        client.add_conforms_to("FILTER")
    return client


def search_scenes(
    url: str,
    region: Region,
    period: Period,
    *,
    accepts_filter: bool | None = None,
    max_items: int | None = None,
    progress: Callable[[str], None] | None = None,
    retry: RetrySettings | None = None,
) -> SearchResult:
    """Search ``url`` for the region's collection over its AOI and period, normalised
    (``retry``: how hard to try each request; default ``RetrySettings.from_env()``)."""
    say = progress or log.info
    if accepts_filter is None:
        accepts_filter = region.source in ACCEPTS_FILTER
    client = open_client(url, accepts_filter=accepts_filter, retry=retry)
    use_filter = client.conforms_to(ConformanceClasses.FILTER)
    kwargs: dict[str, Any] = {
        "collections": [region.collection],
        "intersects": region.geometry,
        "datetime": period.datetime_range,
        "limit": PAGE_SIZE,
        "max_items": max_items,
    }
    if use_filter:
        kwargs["filter"] = {
            "op": "<=",
            "args": [{"property": "eo:cloud_cover"}, region.max_cloud_cover],
        }
        kwargs["filter_lang"] = "cql2-json"
    say(
        f"searching {url} for {region.collection} over {region.id} in {period.id} "
        f"({period.datetime_range}), cloud cover <= {region.max_cloud_cover:g}% "
        f"({'server' if use_filter else 'client'}-side filter)"
    )
    t0 = time.monotonic()
    try:
        search = client.search(**kwargs)
        items = list(_pages(search.pages_as_dicts(), say))
    except (APIError, OSError) as e:
        raise StacSearchError(f"STAC search at {url} failed: {_why(e)}") from e
    elapsed = time.monotonic() - t0
    result = _finish(items, region.max_cloud_cover, use_filter, elapsed)
    if region.uses_s2cloudless and result.scenes:
        attach_l1c(client, url, region, period, result, say)
    return result


def attach_l1c(
    client: pystac_client.Client,
    url: str,
    region: Region,
    period: Period,
    result: SearchResult,
    say: Callable[[str], None],
) -> None:
    """Find each kept scene's L1C twin (for s2cloudless) in ``region.l1c_collection``."""
    from pipelines.stages.stac.l1c import pair_l1c

    say(f"searching {url} for the L1C twins ({region.l1c_collection}) for s2cloudless")
    try:
        search = client.search(
            collections=[region.l1c_collection],
            intersects=region.geometry,
            datetime=period.datetime_range,
            limit=PAGE_SIZE,
        )
        l1c = list(_pages(search.pages_as_dicts(), say))
    except (APIError, OSError) as e:
        raise StacSearchError(f"L1C search at {url} failed: {_why(e)}") from e
    paired = pair_l1c(result.scenes, l1c)
    result.scenes = paired.scenes
    result.l1c_unmatched = paired.unmatched
    for item_id, why in paired.skipped:
        say(f"L1C item {item_id} unusable: {why}")
    say(
        f"L1C twins found for {len(result.scenes) - len(paired.unmatched)} of "
        f"{len(result.scenes)} scenes"
        + (f"; SCL only for {', '.join(paired.unmatched)}" if paired.unmatched else "")
    )


def _why(e: BaseException) -> str:
    """The cause in one line: after retries, which request failed and how."""
    text = str(e)
    if "Max retries exceeded" in text:
        reason = text.split("(Caused by ", 1)[-1].rstrip(")")
        return f"gave up after retries ({reason})"
    return text


def _pages(
    pages: Iterator[Mapping[str, Any]], say: Callable[[str], None]
) -> Iterator[dict[str, Any]]:
    total = 0
    for i, page in enumerate(pages, start=1):
        feats = page.get("features", [])
        total += len(feats)
        say(f"page {i}: {len(feats)} items ({total} so far)")
        yield from feats


def _finish(
    items: list[dict[str, Any]], max_cloud: float, server_filter: bool, elapsed: float
) -> SearchResult:
    norm: NormalizeResult = normalize_items(items)
    kept: list[Scene] = []
    too_cloudy = unknown = 0
    dropped = list(norm.dropped)
    for s in norm.scenes:
        if s.cloud_cover is None:
            unknown += 1  # kept: the composite's SCL mask decides pixel by pixel
        elif s.cloud_cover > max_cloud:
            too_cloudy += 1
            dropped.append((s.id, f"too cloudy: {s.cloud_cover:.1f}% > {max_cloud:g}%"))
            continue
        kept.append(s)
    return SearchResult(
        scenes=kept,
        returned=len(items),
        dropped=dropped,
        server_filter=server_filter,
        too_cloudy=too_cloudy,
        unknown_cloud=unknown,
        pages_s=elapsed,
    )
