"""The composite on a dask.distributed cluster of separate worker processes (a
scheduler and two `dask worker` processes on 127.0.0.1) gives the same COG as the
in-process run; the `dask` resource reaches such a cluster by its address."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio

from pipelines.stages.composite import composite_for_region
from tests.conftest import small_region

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "bench"))

from cluster import ProcessCluster  # noqa: E402


@pytest.mark.slow
def test_composite_on_separate_worker_processes(small_scenes_root: Path, tmp_path: Path) -> None:  # fmt: skip
    import json

    from distributed import Client, get_task_stream

    from assets.resources import DaskResource

    region = small_region()
    period = region.period("2021")
    local, remote = tmp_path / "local", tmp_path / "remote"
    for root in (local, remote):
        shutil.copytree(small_scenes_root / "scenes", root / "scenes")
    ref = composite_for_region(region, period, local, chunk=128, progress=lambda _m: None)

    with ProcessCluster(tmp_path / "cluster") as cluster:
        address = json.loads(cluster.file.read_text())["address"]
        assert address.startswith("tcp://127.0.0.1:")
        probe = Client(address, timeout="30s")
        cluster.add_worker(probe)
        cluster.add_worker(probe)
        pids = set(probe.run(lambda: __import__("os").getpid()).values())
        probe.close()
        assert len(pids) == 2 and all(p != __import__("os").getpid() for p in pids)
        resource = DaskResource(scheduler_address=address)
        client = resource.client()
        try:
            with get_task_stream(client) as stream:
                out = composite_for_region(region, period, remote, client=client, chunk=128, progress=lambda _m: None)  # fmt: skip
            done = client.run(lambda: __import__("os").getpid())
            workers = {t["worker"] for t in stream.data}
        finally:
            resource.close()
    assert set(done.values()) == pids
    # one task per block (read and reduced together), on both processes
    assert len(workers) == 2 and len(stream.data) >= 4, stream.data
    with rasterio.open(ref.path) as a, rasterio.open(out.path) as b:
        assert a.descriptions == b.descriptions and a.transform == b.transform
        np.testing.assert_array_equal(a.read(), b.read())
    assert out.valid_fraction == ref.valid_fraction
