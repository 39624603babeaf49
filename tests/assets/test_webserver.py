"""`asmwatch ui` (what `make ui` runs): a real `dagster dev` on 127.0.0.1, driven over
GraphQL as the UI drives it. The asset graph is read, then one partition of `scenes` is
launched through the webserver and the run is followed to its materialisation."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import external_ip

ROOT = Path(__file__).resolve().parents[2]
ASSET_GRAPH = """
{
  assetNodes {
    assetKey { path }
    groupName
    description
    kinds
    isPartitioned
    partitionKeys
    owners { ... on TeamAssetOwner { team } ... on UserAssetOwner { email } }
    assetChecksOrError { ... on AssetChecks { checks { name } } }
  }
  workspaceOrError { ... on Workspace { locationEntries { name loadStatus } } }
}
"""
LAUNCH = """
mutation Launch($params: ExecutionParams!) {
  launchRun(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
    ... on InvalidSubsetError { message }
    ... on RunConfigValidationInvalid { errors { message } }
  }
}
"""
RUN = """
query Run($id: ID!) {
  runOrError(runId: $id) {
    __typename
    ... on Run {
      status
      tags { key value }
      assetMaterializations { assetKey { path } partition }
    }
  }
}
"""

BACKFILL = """
mutation Backfill($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message }
  }
}
"""
BACKFILL_STATUS = """
query Backfill($id: String!) {
  partitionBackfillOrError(backfillId: $id) { ... on PartitionBackfill { status } }
}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _gql(url: str, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
    r = requests.post(url, json={"query": query, "variables": variables or {}}, timeout=60)
    r.raise_for_status()
    body = r.json()
    assert "errors" not in body, body["errors"]
    return dict(body["data"])


@pytest.mark.slow
def test_ui_serves_the_graph_and_launches_a_partition(tmp_path: Path) -> None:
    port = _free_port()
    env = {
        **os.environ,
        "ASMWATCH_DATA": str(tmp_path / "data"),
        "ASMWATCH_REGIONS": str(ROOT / "regions.yaml"),
        "DAGSTER_HOME": str(tmp_path / "home"),
    }
    log = (tmp_path / "ui.log").open("w")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "asmwatch"), "ui", "--port", str(port)],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/graphql"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (tmp_path / "ui.log").read_text()[-3000:]
            try:
                data = _gql(url, ASSET_GRAPH)
                entries = data["workspaceOrError"]["locationEntries"]
                if entries and entries[0]["loadStatus"] == "LOADED" and data["assetNodes"]:
                    break
            except (requests.ConnectionError, requests.HTTPError, AssertionError):
                pass
            assert time.monotonic() < deadline, "dagster dev did not come up in 180 s"
            time.sleep(2)
        # Bound to loopback only.
        with pytest.raises(OSError), socket.create_connection((external_ip(), port), timeout=2):
            pass

        nodes = {"/".join(n["assetKey"]["path"]): n for n in data["assetNodes"]}
        assert set(nodes) >= {
            "scenes", "composite", "mining_model", "mining_probability", "asm_sites",
            "asm_change", "context_layers", "concession_risk", "protected_area_pressure",
            "hotspots", "alerts", "region_report",
        }  # fmt: skip
        for key, node in nodes.items():
            assert node["description"] and len(node["description"]) > 40, key
            assert node["groupName"] and node["groupName"] != "default", key
            assert node["kinds"], key
            assert {"team": "asmwatch"} in node["owners"], key
        # Only the region|period pairs the regions file defines (synced by `asmwatch ui`
        # and the region_partitions sensor), not the region x period grid.
        from pipelines.regions import load_regions

        config = load_regions(ROOT / "regions.yaml")
        assert nodes["scenes"]["partitionKeys"] == config.partition_keys()
        assert "demo-huepetuhe|2024" not in nodes["scenes"]["partitionKeys"]
        assert nodes["context_layers"]["partitionKeys"] == config.ids
        checks = {k: {c["name"] for c in n["assetChecksOrError"]["checks"]} for k, n in nodes.items()}  # fmt: skip
        for table in ("scenes", "asm_sites", "asm_change", "concession_risk", "alerts"):
            assert checks[table] == {"schema", "non_empty", "geometry_valid", "areas_plausible"}
        assert "valid_fraction" in checks["composite"]

        params = {
            "selector": {
                "repositoryLocationName": "asmwatch",
                "repositoryName": "__repository__",
                "jobName": "ingest",
                "assetSelection": [{"path": ["scenes"]}],
            },
            "mode": "default",
            "runConfigData": {},
            "executionMetadata": {
                "tags": [
                    {"key": "dagster/partition", "value": "demo-huepetuhe|2021"},
                ]
            },
        }
        launched = _gql(url, LAUNCH, {"params": params})["launchRun"]
        assert launched["__typename"] == "LaunchRunSuccess", launched
        run_id = launched["run"]["runId"]
        deadline = time.monotonic() + 240
        while True:
            run = _gql(url, RUN, {"id": run_id})["runOrError"]
            if run["status"] in ("SUCCESS", "FAILURE", "CANCELED"):
                break
            assert time.monotonic() < deadline, f"run {run_id} still {run['status']}"
            time.sleep(2)
        assert run["status"] == "SUCCESS", (tmp_path / "ui.log").read_text()[-3000:]
        assert {"assetKey": {"path": ["scenes"]}, "partition": "demo-huepetuhe|2021"} in run["assetMaterializations"]  # fmt: skip
        assert (tmp_path / "data" / "scenes" / "demo-huepetuhe" / "2021.parquet").exists()
        tags = {t["key"]: t["value"] for t in run["tags"]}
        assert tags.get("dagster/max_retries") == "2"  # the job's run-retry policy

        # A backfill over two periods of the region, run by the daemon.
        wanted = ["demo-huepetuhe|2019", "demo-huepetuhe|2020"]
        params = {"assetSelection": [{"path": ["scenes"]}], "partitionNames": wanted}
        backfill = _gql(url, BACKFILL, {"params": params})["launchPartitionBackfill"]
        assert backfill["__typename"] == "LaunchBackfillSuccess", backfill
        deadline = time.monotonic() + 300
        while True:
            status = _gql(url, BACKFILL_STATUS, {"id": backfill["backfillId"]})
            state = status["partitionBackfillOrError"]["status"]
            if state not in ("REQUESTED", "CANCELING", "FAILING"):
                break
            assert time.monotonic() < deadline, f"backfill still {state}"
            time.sleep(3)
        assert state in ("COMPLETED", "COMPLETED_SUCCESS"), (tmp_path / "ui.log").read_text()[
            -3000:
        ]
        for p in ("2019", "2020"):
            assert (tmp_path / "data" / "scenes" / "demo-huepetuhe" / f"{p}.parquet").exists()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()
