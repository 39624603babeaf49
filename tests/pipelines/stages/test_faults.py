"""Faults between asmwatch and a real STAC API: the embedded stac-fastapi server behind a
fault-injecting proxy on 127.0.0.1 that fails chosen requests with 500s or stalls them.

Searches page through 2 items a page so the faults land in the middle of paging.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

import pipelines.stages.stac.search as search_mod
from pipelines.infra.errors import transient_cause
from pipelines.stages.stac.search import RetrySettings, StacSearchError, search_scenes
from tests.conftest import small_region

Rule = Callable[[str, int], str]  # (path, n-th search request) -> "pass" | "500" | "stall"


class FaultProxy:
    """A real HTTP proxy that forwards to ``upstream`` unless ``rule`` says otherwise."""

    def __init__(self, upstream: str, stall_s: float = 2.0) -> None:
        self.upstream = upstream.rstrip("/")
        self.rule: Rule = lambda _p, _n: "pass"
        self.searches = 0
        self.log: list[tuple[str, int, str]] = []
        self.stall_s = stall_s
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_a: Any) -> None:
                pass

            def _handle(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                n = 0
                if self.path.startswith("/search"):
                    proxy.searches += 1
                    n = proxy.searches
                action = proxy.rule(self.path, n)
                proxy.log.append((self.path.split("?")[0], n, action))
                if action in ("500", "400"):
                    self.send_response(int(action))
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    self.wfile.write(b'{"code": "Injected", "description": "injected"}')
                    return
                if action == "stall":
                    time.sleep(proxy.stall_s)
                    return  # closes without an answer
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("content-length", "accept-encoding")}  # fmt: skip
                r = requests.request(self.command, proxy.upstream + self.path, data=body or None, headers=headers, timeout=30)  # fmt: skip
                data = r.content.replace(proxy.upstream.encode(), proxy.url.encode())
                self.send_response(r.status_code)
                self.send_header("Content-Type", r.headers.get("Content-Type", "application/json"))
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FaultProxy:
        self.thread.start()
        return self

    def __exit__(self, *_a: Any) -> None:
        self.server.shutdown()
        self.server.server_close()

    def attempts(self, n: int) -> int:
        return sum(1 for _p, i, _a in self.log if i >= n)


@pytest.fixture
def proxy(small_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultProxy]:
    monkeypatch.setattr(search_mod, "PAGE_SIZE", 2)
    with FaultProxy(small_server) as p:
        yield p


FAST = RetrySettings(retries=3, backoff_s=0.2, timeout_s=1.0)


def _search(url: str, monkeypatch: pytest.MonkeyPatch, settings: RetrySettings = FAST) -> Any:
    monkeypatch.setattr(RetrySettings, "from_env", classmethod(lambda cls: settings))
    region = small_region()
    return search_scenes(url, region, region.periods[0], progress=lambda _m: None)


def test_paging_through_the_proxy_is_faithful(proxy: FaultProxy, small_server: str, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    direct = _search(small_server, monkeypatch)
    via = _search(proxy.url, monkeypatch)
    assert [s.id for s in via.scenes] == [s.id for s in direct.scenes] and via.returned >= 3
    assert proxy.searches >= 2  # more than one page


def test_500s_in_the_middle_of_paging_are_retried_with_backoff(proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    failures = {"left": 2}

    def rule(_path: str, n: int) -> str:
        if n >= 2 and failures["left"] > 0:  # page 2 fails twice
            failures["left"] -= 1
            return "500"
        return "pass"

    proxy.rule = rule
    t0 = time.monotonic()
    res = _search(proxy.url, monkeypatch)
    took = time.monotonic() - t0
    assert res.returned >= 3 and not failures["left"]
    assert [a for _p, _n, a in proxy.log].count("500") == 2
    # urllib3 retries the first failure at once, then waits backoff x 2: 0.4 s here.
    assert took >= 0.2 * 2 * 0.9


def test_persistent_500s_fail_naming_the_url(proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    proxy.rule = lambda _p, n: "500" if n >= 2 else "pass"
    with pytest.raises(StacSearchError) as e:
        _search(proxy.url, monkeypatch)
    msg = str(e.value)
    assert msg.startswith(f"STAC search at {proxy.url} failed: gave up after retries")
    assert "500" in msg
    assert proxy.attempts(2) == FAST.retries + 1  # the first try and 3 retries
    assert transient_cause(e.value) is not None  # so the asset's retry policy tries again


def test_a_stalled_page_is_retried_then_a_stalling_server_fails(proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    stalled = {"left": 1}

    def once(_path: str, n: int) -> str:
        if n >= 2 and stalled["left"]:
            stalled["left"] -= 1
            return "stall"
        return "pass"

    proxy.rule = once
    assert _search(proxy.url, monkeypatch).returned >= 3 and not stalled["left"]
    proxy.rule = lambda _p, n: "stall" if n >= 2 else "pass"
    proxy.searches = 0
    with pytest.raises(StacSearchError, match=r"timed out|ReadTimeout") as e:
        _search(proxy.url, monkeypatch)
    assert proxy.url in str(e.value)
    assert transient_cause(e.value) is not None


def test_server_down_at_the_start(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(StacSearchError, match=rf"cannot open STAC API http://127.0.0.1:{port}/") as e:  # fmt: skip
        _search(f"http://127.0.0.1:{port}/", monkeypatch)
    assert time.monotonic() - t0 >= 0.2 * (2 + 4) * 0.9  # 3 retries: 0, 0.4 and 0.8 s apart
    assert transient_cause(e.value) is not None


def test_what_is_transient_and_what_is_not(proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Only faults a later try may not meet are retried by the assets' policies: a 400
    (a bad query) is not one, nor bad input or a bug; GDAL's curl and 5xx words are."""
    import rasterio.errors

    proxy.rule = lambda _p, n: "400" if n >= 2 else "pass"
    with pytest.raises(StacSearchError) as e:
        _search(proxy.url, monkeypatch)
    assert transient_cause(e.value) is None, str(e.value)
    for bad in (ValueError("regions.yaml: bad bbox"), KeyError("B04"), ZeroDivisionError()):
        assert transient_cause(bad) is None
    gdal = rasterio.errors.RasterioIOError("HTTP response code: 503 - https://x/B04.tif")
    assert transient_cause(RuntimeError("composite failed")) is None
    try:
        raise RuntimeError("composite: block read failed") from gdal
    except RuntimeError as chained:
        assert transient_cause(chained) == "HTTP response code: 503 - https://x/B04.tif"
    assert transient_cause(rasterio.errors.RasterioIOError("CURL error: Could not resolve host: x")) is not None  # fmt: skip


def test_a_cog_truncated_while_the_run_reads_it(small_scenes_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """The file passes the scene check, then loses its second half before the blocks are
    read (a sync cut short, a disk filling up): the failed reads are reported with the
    file named, that scene is no data there, and the composite still lands."""
    import json
    import shutil

    import pipelines.stages.composite.write as comp  # build_composite checks the files there
    from pipelines.infra.layout import scenes_path
    from pipelines.stages.composite import build_composite, read_scene_items, region_geobox

    region = small_region()
    items = [json.loads(json.dumps(i)) for i in read_scene_items(scenes_path(small_scenes_root, region.id, "2021"))]  # fmt: skip
    red = items[0]["assets"]["red"]
    victim = tmp_path / "B04.tif"
    shutil.copy(Path(red["href"].removeprefix("file://")), victim)
    red["href"] = victim.as_uri()
    real_check = comp.check_scene_files

    def check_then_truncate(*a: Any, **kw: Any) -> Any:
        out = real_check(*a, **kw)
        size = victim.stat().st_size
        with victim.open("r+b") as f:
            f.truncate(size // 2)
        return out

    monkeypatch.setattr(comp, "check_scene_files", check_then_truncate)
    res = build_composite(items, region_geobox(region), tmp_path / "c.tif", chunk=128)
    assert res.skipped == []  # it was fine when checked
    assert res.read_failures and all("B04.tif" in m for m in res.read_failures)
    assert res.path.exists() and res.valid_fraction > 0.5
