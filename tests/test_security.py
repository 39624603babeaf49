"""Security: loopback-only servers, paths confined to the data root, a read-only SQL
command for analysts. (Credentials: tests/pipelines/stages/test_signing.py; SQL parameters
with hostile names: tests/pipelines/stages/test_risk_tables.py and tests/pipelines/stages/test_reports.py.)"""

from __future__ import annotations

import socket
from pathlib import Path
from urllib.parse import urlparse

import pytest

from assets.cli import main
from assets.resources import StacResource
from pipelines.infra.layout import context_table_path, report_dir, risk_path, sites_path
from pipelines.infra.storage import UnsafePathError, partition_path
from tests.conftest import external_ip


def test_the_stac_server_listens_on_loopback_only(small_server: str) -> None:
    url = urlparse(small_server)
    assert url.hostname == "127.0.0.1"
    with socket.create_connection(("127.0.0.1", url.port), timeout=5):
        pass
    with pytest.raises(OSError), socket.create_connection((external_ip(), url.port), timeout=2):
        pass


@pytest.mark.parametrize(
    "region, period",
    [("../etc", "2021"), ("demo", "../../x"), ("a/b", "2021"), ("demo", "2021/.."),
     ("", "2021"), ("demo", ".hidden"), ("demo", "2021\x00"), ("..", "2021")],
)  # fmt: skip
def test_ids_cannot_leave_the_data_root(tmp_path: Path, region: str, period: str) -> None:
    for build in (
        lambda: sites_path(tmp_path, region, period),
        lambda: risk_path(tmp_path, "alerts", region, period),
        lambda: partition_path(tmp_path, "composite", region, period, ".tif"),
    ):
        with pytest.raises(UnsafePathError, match="not a plain name"):
            build()
    with pytest.raises(UnsafePathError):
        context_table_path(tmp_path, region or "..", "../concessions")
    with pytest.raises(UnsafePathError):
        report_dir(tmp_path, "../" + region)


def test_a_symlink_out_of_the_root_is_refused(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "sites").symlink_to(outside)
    with pytest.raises(UnsafePathError, match="resolves outside the data root"):
        sites_path(root, "demo", "2021")
    clean = tmp_path / "clean"
    clean.mkdir()
    assert sites_path(clean / ".." / "clean", "demo", "2021").name == "2021.parquet"


@pytest.mark.slow
def test_the_sql_command_cannot_change_the_catalog(
    demo_run: tuple[Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    root = demo_run[0]
    for statement in ("DROP VIEW scenes", "CREATE TABLE x AS SELECT 1", "CREATE VIEW y AS SELECT 1"):  # fmt: skip
        assert main(["sql", statement, "--data", str(root)]) == 2
        err = capsys.readouterr().err
        assert "statements are refused: the catalog is read-only" in err, err
    assert main(["sql", "SELECT count(*) AS n FROM scenes", "--data", str(root)]) == 0
    assert "11" in capsys.readouterr().out


def test_the_planetary_computer_key_is_a_dagster_envvar(monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    import dagster as dg

    from assets.definitions import PC_KEY_VAR, LocationConfig, stac_resource

    monkeypatch.delenv(PC_KEY_VAR, raising=False)
    assert LocationConfig.from_environment().pc_key_from_env is False
    assert stac_resource(False).pc_subscription_key == ""
    secret = "pc-key-0b7d"
    monkeypatch.setenv(PC_KEY_VAR, secret)
    assert LocationConfig.from_environment().pc_key_from_env is True
    stac = stac_resource(True)
    assert isinstance(stac.pc_subscription_key, dg.EnvVar)
    assert stac.pc_subscription_key.env_var_name == PC_KEY_VAR  # the name, not the value

    @dg.asset
    def probe(stac: StacResource) -> bool:
        return stac.pc_subscription_key == secret  # resolved inside the run only

    result = dg.materialize([probe], resources={"stac": stac})
    assert result.output_for_node("probe") is True
    logged = "\n".join(str(e) for e in result.all_events)
    assert secret not in logged and secret not in str(result.dagster_run.run_config)
