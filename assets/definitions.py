"""The Dagster code location of asmwatch (workspace.yaml loads this module)."""

from __future__ import annotations

import os

import dagster as dg

from assets.automation import (
    RUN_RETRY_TAGS,
    build_schedules,
    new_scenes,
    refresh_job,
    report_job,
    reports_after_alerts,
)
from assets.change import asm_change
from assets.composite import composite
from assets.context import context_layers
from assets.detection import asm_sites, mining_model, mining_probability
from assets.reports import region_report
from assets.resources import AsmwatchSettings, DaskResource, StacResource, TorchResource
from assets.risk import RISK_ASSETS
from assets.scenes import scenes

#: Region x period work up to the composite; then the model (all regions at once);
#: then the per-partition detections and change (periods in order: change compares with
#: the previous period). `asmwatch demo` runs them in that order.
ingest_job = dg.define_asset_job(
    "ingest", selection=[scenes, composite], tags=RUN_RETRY_TAGS,
    description="STAC search and the median composite of one region and period.",
)  # fmt: skip
model_job = dg.define_asset_job(
    "train_model", selection=[mining_model], tags=RUN_RETRY_TAGS,
    description=(
        "Trains the U-Net on the training periods' composites and truth (all regions at "
        "once), or reuses the registered model when its inputs are unchanged."
    ),
)  # fmt: skip
context_job = dg.define_asset_job(
    "load_context", selection=[context_layers], tags=RUN_RETRY_TAGS,
    description=(
        "A region's reference layers (protected areas, indigenous lands, concessions, "
        "settlements, grievances), checked and written as GeoParquet."
    ),
)  # fmt: skip
detect_job = dg.define_asset_job(
    "detect", selection=[mining_probability, asm_sites, asm_change, *RISK_ASSETS],
    tags=RUN_RETRY_TAGS,
    description=(
        "Probability, sites, change and the risk tables of one region and period (run the "
        "periods of a region in order: change compares with the previous period)."
    ),
)  # fmt: skip

PC_KEY_VAR = "PC_SDK_SUBSCRIPTION_KEY"


def stac_resource() -> StacResource:
    """The STAC resource; a Planetary Computer key only as a Dagster EnvVar, so the UI
    and run config show the variable's name, never its value."""
    if os.environ.get(PC_KEY_VAR):
        return StacResource(pc_subscription_key=dg.EnvVar(PC_KEY_VAR))
    return StacResource()


defs = dg.Definitions(
    assets=[
        scenes,
        composite,
        mining_model,
        mining_probability,
        asm_sites,
        asm_change,
        context_layers,
        *RISK_ASSETS,
        region_report,
    ],
    jobs=[ingest_job, model_job, detect_job, context_job, refresh_job, report_job],
    schedules=build_schedules(),
    sensors=[new_scenes, reports_after_alerts],
    resources={
        "settings": AsmwatchSettings(),
        "stac": stac_resource(),
        "dask": DaskResource(),
        "torch_device": TorchResource(),
    },
)
