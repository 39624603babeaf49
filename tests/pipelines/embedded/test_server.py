"""The embedded STAC server's life cycle: start on a free port, clear errors, clean stop."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import requests

from pipelines.embedded.server import EmbeddedStacServer, StacServerError


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    server = EmbeddedStacServer(tmp_path / "nope.parquet", tmp_path)
    with pytest.raises(StacServerError, match=r"nope\.parquet: file not found"):
        server.start()


def test_corrupt_file_fails_with_the_server_log(tmp_path: Path) -> None:
    bad = tmp_path / "items.parquet"
    bad.write_bytes(b"this is not parquet")
    server = EmbeddedStacServer(bad, tmp_path, startup_timeout_s=30)
    with pytest.raises(StacServerError, match=r"exited with code|did not answer"):
        server.start()
    assert server._proc is None


def test_stop_ends_the_process_group(small_world: Path, tmp_path: Path) -> None:
    from pipelines.embedded.simulator import load_items
    from pipelines.stages.stac.geoparquet import write_geoparquet

    gp = write_geoparquet(load_items(small_world)[:2], tmp_path / "items.parquet")
    server = EmbeddedStacServer(gp, tmp_path)
    url = server.start()
    assert url.startswith("http://127.0.0.1:")
    pid = server._proc.pid  # type: ignore[union-attr]
    assert requests.get(f"{url}/collections/sentinel-2-l2a", timeout=5).status_code == 200
    server.stop()
    server.stop()  # twice is fine
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)
    with pytest.raises(requests.ConnectionError):
        requests.get(url, timeout=2)
