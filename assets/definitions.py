"""The asmwatch definitions, built from configuration by ``build_definitions``.

The code location's entry point (``assets/location.py``, which workspace.yaml loads) is
the one place that reads the environment; everything else gets a ``LocationConfig``.
So a test, the CLI and the UI build the same definitions for whatever data root and
regions file they are given, and the regions file is parsed once per build.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import dagster as dg

from assets.automation import (
    RUN_RETRY_TAGS,
    build_schedules,
    new_scenes,
    refresh_job,
    region_partitions,
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
from pipelines.infra.storage import data_root
from pipelines.regions import load_regions, regions_path

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


@dataclass(frozen=True)
class LocationConfig:
    """What the definitions are built for: the data root and the regions file."""

    data_root: Path
    regions_file: Path
    #: Give the STAC resource the Planetary Computer key as ``dg.EnvVar(PC_KEY_VAR)``
    #: (read by Dagster when a run starts; the UI shows the variable's name only).
    pc_key_from_env: bool = False

    @classmethod
    def from_environment(cls) -> LocationConfig:
        """``$ASMWATCH_DATA`` (else ./data), ``$ASMWATCH_REGIONS`` (else regions.yaml),
        and whether ``$PC_SDK_SUBSCRIPTION_KEY`` is set."""
        return cls(
            data_root=data_root(None),
            regions_file=regions_path().resolve(),
            pc_key_from_env=bool(os.environ.get(PC_KEY_VAR)),
        )


def stac_resource(pc_key_from_env: bool) -> StacResource:
    """The STAC resource; a Planetary Computer key only as a Dagster EnvVar, so the UI
    and run config show the variable's name, never its value."""
    if pc_key_from_env:
        return StacResource(pc_subscription_key=dg.EnvVar(PC_KEY_VAR))
    return StacResource()


ASSETS = [
    scenes,
    composite,
    mining_model,
    mining_probability,
    asm_sites,
    asm_change,
    context_layers,
    *RISK_ASSETS,
    region_report,
]


def build_definitions(config: LocationConfig) -> dg.Definitions:
    """The assets, jobs, schedules, sensors and resources for ``config``.

    The regions file is parsed here, once (a bad file fails the load with every
    problem named); it decides the schedules. Partitions come from it at run time
    (``assets.partitions``), so editing it needs no reload for new partitions.
    """
    regions = load_regions(config.regions_file)
    return dg.Definitions(
        assets=ASSETS,
        jobs=[ingest_job, model_job, detect_job, context_job, refresh_job, report_job],
        schedules=build_schedules(regions),
        sensors=[new_scenes, reports_after_alerts, region_partitions],
        resources={
            "settings": AsmwatchSettings(
                data_root=str(config.data_root), regions_file=str(config.regions_file)
            ),
            "stac": stac_resource(config.pc_key_from_env),
            "dask": DaskResource(),
            "torch_device": TorchResource(),
        },
    )
