"""The Dagster code location of asmwatch (workspace.yaml loads this module)."""

from __future__ import annotations

import dagster as dg

from assets.resources import AsmwatchSettings, StacResource
from assets.scenes import scenes

defs = dg.Definitions(
    assets=[scenes],
    resources={"settings": AsmwatchSettings(), "stac": StacResource()},
)
