"""Reading Sentinel-2 COGs over HTTP, as from Earth Search's bucket: the real 29RKH
scene's files served with byte ranges by a server on 127.0.0.1 at Earth Search's
paths, so the composite takes the remote path (GDAL's /vsicurl/, odc-stac's cloud
settings) instead of reading local files. Faults are injected per request.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio

from pipelines.stages.composite import build_composite, check_scene_files
from tests.conftest import REAL_TILE, real_tile_items, shared

PREFIX = "/sentinel-s2-l2a-cogs/29/R/KH/2020/2/S2A_29RKH_20200219_0_L2A/"


class CogServer:
    """Files of one directory over HTTP/1.1 (HEAD, single byte ranges), served by a
    separate process: GDAL holds the interpreter while it opens a remote file, so a
    server thread in the test's own process could deadlock with it.

    ``faults``: {file name: {n-th request for it: HTTP status to answer instead}};
    ``required``: request headers without which it answers 403.
    """

    def __init__(
        self,
        directory: Path,
        faults: dict[str, dict[int, int]] | None = None,
        prefix: str = PREFIX,
        required: list[str] | None = None,
    ) -> None:
        self.log_path = Path(tempfile.mkstemp(suffix=".jsonl")[1])
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.pipelines.cog_server", str(directory), prefix,
             json.dumps(faults or {}), str(self.log_path), json.dumps(required or [])],
            stdout=subprocess.PIPE, cwd=Path(__file__).resolve().parents[3],
        )  # fmt: skip
        assert self.proc.stdout is not None
        self.url = self.proc.stdout.readline().decode().strip()
        assert self.url.startswith("http://127.0.0.1:"), self.url

    @property
    def log(self) -> list[tuple[str, str, int, int]]:
        """(file name, Range header, status, body bytes) of each request, in order."""
        lines = self.log_path.read_text().splitlines()
        return [tuple(json.loads(line)) for line in lines]

    def served(self, status: int | None = None) -> list[tuple[str, str, int, int]]:
        return [r for r in self.log if status is None or r[2] == status]

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.log_path.unlink(missing_ok=True)


@pytest.fixture
def cog_server() -> Iterator[Callable[..., CogServer]]:
    started: list[CogServer] = []

    def start(faults: dict[str, dict[int, int]] | None = None, **kw: Any) -> CogServer:
        started.append(CogServer(shared(REAL_TILE), faults, **kw))
        return started[-1]

    yield start
    for s in started:
        s.close()


def _bands(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read()


@pytest.fixture(scope="module")
def local_composite(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    items, geobox = real_tile_items(200.0)
    res = build_composite(items, geobox, tmp_path_factory.mktemp("local") / "c.tif", chunk=128)
    return _bands(res.path)


def test_the_composite_reads_earth_search_cogs_over_http_with_ranges(
    cog_server: Callable[..., CogServer], local_composite: np.ndarray, tmp_path: Path
) -> None:
    cogs = cog_server()
    items, geobox = real_tile_items(200.0, base_url=cogs.url)
    assert items[0]["assets"]["red"]["href"] == f"{cogs.url}{PREFIX}B04.tif"
    res = build_composite(items, geobox, tmp_path / "c.tif", chunk=128)
    assert not res.skipped and not res.empty
    got = _bands(res.path)
    np.testing.assert_array_equal(got, local_composite)  # NaN where cloudy, on both
    # Only byte ranges were read: no whole-file GETs, and far less than the files.
    reads = [r for r in cogs.served() if r[3]]
    assert reads and all(r[2] == 206 for r in reads), {r[2] for r in reads}
    names = {r[0] for r in reads}
    assert names == {"B02.tif", "B03.tif", "B04.tif", "B08.tif", "B11.tif", "B12.tif", "SCL.tif"}
    whole = sum((shared(REAL_TILE) / n).stat().st_size for n in names)
    assert sum(r[3] for r in reads) < whole


def test_transient_503s_on_imagery_reads_are_retried(
    cog_server: Callable[..., CogServer], local_composite: np.ndarray, tmp_path: Path
) -> None:
    """S3 answers 503 SlowDown under load: the first two requests for B04 (the scene
    check's) and the 4th and 5th (the block reads') fail, and the run still reads every
    pixel: nothing is skipped or left as nodata."""
    cogs = cog_server({"B04.tif": {1: 503, 2: 503, 4: 503, 5: 503}})
    items, geobox = real_tile_items(200.0, base_url=cogs.url)
    res = build_composite(items, geobox, tmp_path / "c.tif", chunk=128)
    assert [r[2] for r in cogs.log if r[0] == "B04.tif"][:2] == [503, 503]
    assert len(cogs.served(503)) == 4
    assert not res.skipped and not res.read_failures
    np.testing.assert_array_equal(_bands(res.path), local_composite)


def test_a_missing_remote_band_skips_the_scene_naming_the_url(
    cog_server: Callable[..., CogServer],
) -> None:
    cogs = cog_server({"B11.tif": {n: 404 for n in range(1, 50)}})
    items, _ = real_tile_items(200.0, base_url=cogs.url)
    ok, skipped = check_scene_files(items)
    assert not ok and len(skipped) == 1
    assert skipped[0].id == "S2A_29RKH_20200219_0_L2A"
    assert f"swir16: {cogs.url}{PREFIX}B11.tif" in skipped[0].reason


def _s3_stand_in(monkeypatch: pytest.MonkeyPatch, cogs: CogServer) -> None:
    """Point GDAL's /vsis3/ at ``cogs`` (path-style, plain http), no AWS settings."""
    monkeypatch.setenv("AWS_S3_ENDPOINT", cogs.url.removeprefix("http://"))
    monkeypatch.setenv("AWS_HTTPS", "NO")
    monkeypatch.setenv("AWS_VIRTUAL_HOSTING", "FALSE")
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_REQUEST_PAYER"):
        monkeypatch.delenv(var, raising=False)


def _pay_for_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-a-real-secret")
    monkeypatch.setenv("AWS_REQUEST_PAYER", "requester")


def test_requester_pays_s3_reads_are_signed_only_when_the_environment_asks(
    cog_server: Callable[..., CogServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Earth Search's L1C twins are in the requester-pays bucket s3://sentinel-s2-l1c.

    An S3 stand-in on 127.0.0.1 (GDAL's /vsis3/ pointed at it with AWS_S3_ENDPOINT)
    refuses requests without a signature and the payer header, as S3 does. With no AWS
    settings the reads are unsigned and refused, and the scene is skipped naming the
    href; with credentials and ``AWS_REQUEST_PAYER=requester`` they are signed, carry
    the header, and read. (The files are the L2A tile's, served under the L1C key.)
    """
    key = "/sentinel-s2-l1c/tiles/29/R/KH/2020/2/19/0/"
    cogs = cog_server(prefix=key, required=["Authorization", "x-amz-request-payer"])
    _s3_stand_in(monkeypatch, cogs)

    def twin(band: str) -> dict[str, Any]:
        href = f"s3:/{key}{band}.tif"
        return {"id": f"S2A_29RKH_20200219_0_L1C_{band}", "assets": {"l1c_B04": {"href": href}}}

    # Different files each time: GDAL caches what it learnt about a URL.
    ok, skipped = check_scene_files([twin("B04")], roles=("l1c_B04",))
    assert not ok and "l1c_B04: s3://sentinel-s2-l1c/tiles/29/R/KH/2020/2/19/0/B04.tif" in skipped[0].reason  # fmt: skip
    assert {r[2] for r in cogs.log} == {403}

    _pay_for_requests(monkeypatch)
    ok, skipped = check_scene_files([twin("B03")], roles=("l1c_B04",))
    assert not skipped and len(ok) == 1
    assert {r[2] for r in cogs.log if r[0] == "B03.tif"} <= {200, 206}


def test_the_load_signs_s3_reads_when_the_environment_has_credentials(
    cog_server: Callable[..., CogServer],
    local_composite: np.ndarray,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """The block reads (odc-stac's load, not only the scene check) take the credentials
    and the payer header from the environment: s3:// hrefs on a stand-in that refuses
    unsigned requests give the same composite as the local files."""
    cogs = cog_server(prefix=f"/sentinel-cogs{PREFIX}", required=["Authorization", "x-amz-request-payer"])  # fmt: skip
    _s3_stand_in(monkeypatch, cogs)
    _pay_for_requests(monkeypatch)
    items, geobox = real_tile_items(200.0, base_url="s3://sentinel-cogs")
    assert items[0]["assets"]["red"]["href"] == f"s3://sentinel-cogs{PREFIX}B04.tif"
    res = build_composite(items, geobox, tmp_path / "c.tif", chunk=128)
    assert not res.skipped and not res.read_failures
    np.testing.assert_array_equal(_bands(res.path), local_composite)
    assert cogs.served(206) and not cogs.served(403)
