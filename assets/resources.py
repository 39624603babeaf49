"""Dagster resources: settings (data root, regions file) and STAC access.

``StacResource`` hands an asset the STAC API URL for a region: the preset or URL from
the regions file, or, for ``source: embedded``, a local stac-fastapi server it starts on
demand (first use in a run), on a free port on 127.0.0.1, and stops with the run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import PrivateAttr

from pipelines.embedded import start_server
from pipelines.regions import Region, RegionsConfig, load_regions
from pipelines.stac.server import EmbeddedStacServer
from pipelines.storage import data_root


class AsmwatchSettings(dg.ConfigurableResource):
    """Where the data root and the regions file are (empty: the environment's defaults)."""

    data_root: str = ""  # default: $ASMWATCH_DATA or ./data
    regions_file: str = ""  # default: $ASMWATCH_REGIONS or regions.yaml

    def root(self) -> Path:
        return data_root(self.data_root or None)

    def regions(self) -> RegionsConfig:
        return load_regions(self.regions_file or None)


class StacResource(dg.ConfigurableResource):
    """STAC API access; starts the embedded server for embedded regions."""

    startup_timeout_s: float = 60.0
    _servers: dict[str, EmbeddedStacServer] = PrivateAttr(default_factory=dict)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self._servers = {}

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        self.stop_all()

    def url_for(self, region: Region, root: Path, log: Any = None) -> str:
        if region.source != "embedded":
            url = region.stac_url
            assert url is not None
            return url
        if region.id not in self._servers:
            say = log.info if log is not None else print
            self._servers[region.id] = start_server(
                root, region, say=say, startup_timeout_s=self.startup_timeout_s
            )
        return self._servers[region.id].url

    def stop_all(self) -> None:
        for server in self._servers.values():
            server.stop()
        self._servers = {}
