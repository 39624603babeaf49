"""Benchmark: normalising STAC items vs merely parsing them with pystac (baseline).

Both run in this process over the same items (the embedded demo world, or the real
Earth Search twin search from ../shared/data when present). Prints wall time of each and
their ratio. Normalisation should cost no more than a small multiple of parsing.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import pystac

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipelines.embedded.simulator import load_items, simulate_world  # noqa: E402
from pipelines.regions import load_regions  # noqa: E402
from pipelines.stages.stac.normalize import normalize_items  # noqa: E402


def items() -> list[dict]:
    shared = ROOT.parent / "shared" / "data" / "stac" / "earth-search-v1"
    pages = sorted(shared.glob("search-post_bbox-9-47-10-48_*page*.json"))
    if pages:
        return [f for p in pages for f in json.loads(p.read_text())["features"]]
    with tempfile.TemporaryDirectory() as d:
        simulate_world(load_regions(ROOT / "regions.yaml").get("demo-huepetuhe"), Path(d) / "w")
        return load_items(Path(d) / "w")


def timed(fn, n: int) -> float:  # type: ignore[no-untyped-def]
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


def main() -> None:
    its = items()
    n = 200
    base = timed(lambda: [pystac.Item.from_dict(i, preserve_dict=True) for i in its], n)
    ours = timed(lambda: normalize_items(its), n)
    print(f"items: {len(its)}, repeats: {n}")
    print(f"baseline pystac.Item.from_dict: {base * 1e3:.2f} ms per batch")
    print(f"normalize_items (roles, scale/offset, twins): {ours * 1e3:.2f} ms per batch")
    print(f"ratio normalize / parse: {ours / base:.2f}x")


if __name__ == "__main__":
    main()
