"""The ``scenes`` asset against Earth Search, replaying a recorded real session.

Earth Search cannot be reached from here (the machines reach only the package
registries), so the real code path (the region's `source: earth-search` preset, the
pystac-client search with the CQL2 filter, normalisation, the GeoParquet write, the
catalog view and the asset checks) runs in Dagster against the recorded responses
of a real Earth Search v1 session. Any request the session did not record fails the run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from assets.partitions import partition_key
from assets.resources import AsmwatchSettings, StacResource
from assets.scenes import scenes
from pipelines.stages.catalog import connect
from tests.conftest import materialize, shared

CASSETTE = "stac/cassettes/xcube-stac_test_search_data_searchable_catalog_earth-search-v1.yaml"


def _regions(tmp_path: Path) -> Path:
    doc = {
        "regions": [
            {
                # A shipped region id (so the partition exists), over the recorded AOI.
                "id": "madre-de-dios",
                "name": "recorded Earth Search session (Lake Constance, 2020-03)",
                "aoi": {"bbox": [9.0, 47.0, 10.0, 48.0]},
                "periods": [2020],
                "source": "earth-search",
                "max_cloud_cover": 100,
            }
        ]
    }
    path = tmp_path / "regions.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_scenes_asset_against_a_recorded_earth_search_session(tmp_path: Path) -> None:
    vcr = pytest.importorskip("vcr")
    cassette = shared(CASSETTE)
    resources = {
        "settings": AsmwatchSettings(
            data_root=str(tmp_path / "data"), regions_file=str(_regions(tmp_path))
        ),
        "stac": StacResource(),
    }
    replay = vcr.VCR(record_mode="none", match_on=["method", "uri"])
    with replay.use_cassette(str(cassette)) as played:
        result = materialize(
            [scenes], partition_key=partition_key("madre-de-dios", "2020"), resources=resources
        )
        asked = [(r.method, r.uri) for i, r in enumerate(played.requests) if played.play_counts[i]]
    assert result.success
    # The landing page, then the search pages (10, 6 and 0 items, each following the
    # server's `next` link): nothing else was asked for.
    es = "https://earth-search.aws.element84.com/v1"
    assert asked == [("GET", es)] + [("POST", f"{es}/search")] * 3
    assert played.play_count == 4
    meta = {k: v.value for k, v in result.asset_materializations_for_node("scenes")[0].metadata.items()}  # fmt: skip
    # 16 items come back: 8 scenes, each with its reprocessed (baseline 05.00) twin.
    assert meta["returned"] == 16 and meta["scene_count"] == 8 and meta["dropped"] == 8
    assert meta["server_side_filter"] is True and meta["stac_source"] == "earth-search"
    assert meta["baselines"] == ["05.00"] and meta["tiles"]
    checks = result.get_asset_check_evaluations()
    assert len(checks) == 4 and all(c.passed for c in checks), [c.check_name for c in checks if not c.passed]  # fmt: skip

    con = connect(tmp_path / "data" / "asmwatch.duckdb", read_only=True)
    rows = con.sql(
        "SELECT id, mgrs_tile, processing_baseline FROM scenes "
        "WHERE region = 'madre-de-dios' AND period = '2020' ORDER BY id"
    ).fetchall()
    con.close()
    assert len(rows) == 8 and {r[2] for r in rows} == {"05.00"}
    assert all(r[0].endswith("_1_L2A") for r in rows)
    assert {r[1] for r in rows} >= {"32TMT", "32TNT", "32UMU", "32UNU"}
