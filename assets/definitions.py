"""The Dagster code location of asmwatch (workspace.yaml loads this module)."""

from __future__ import annotations

import dagster as dg

from assets.composite import composite
from assets.resources import AsmwatchSettings, DaskResource, StacResource
from assets.scenes import scenes

defs = dg.Definitions(
    assets=[scenes, composite],
    resources={"settings": AsmwatchSettings(), "stac": StacResource(), "dask": DaskResource()},
)
