"""The detection assets: ``mining_model``, ``mining_probability`` and ``asm_sites``.

No ``from __future__ import annotations`` here: Dagster inspects the context annotation.
"""

from typing import TYPE_CHECKING, Any

import dagster as dg

from assets.checks import column_schema, row_count, specs, table_checks
from assets.composite import composite
from assets.partitions import REGION_PERIODS, region_and_period
from assets.resources import AsmwatchSettings, DaskResource, TorchResource, fail_fast

# torch and the detection stage load in the asset bodies, not at definition load (the
# Dagster UI and every run's code location would otherwise pay about 2 s for torch).
from pipelines.infra.errors import MissingInputError
from pipelines.stages.catalog import refresh_views
from pipelines.stages.sites import sites_for_period
from pipelines.thresholds import MMU_HA

if TYPE_CHECKING:
    from ml.train import TrainConfig


class MiningModelConfig(dg.Config):
    """Training knobs (the defaults train the demo in a few minutes on 2 CPU cores)."""

    chip: int = 128
    batch: int = 16
    steps_per_epoch: int = 12
    max_epochs: int = 20
    patience: int = 4
    seed: int = 42

    def train_config(self) -> "TrainConfig":
        from ml.train import TrainConfig

        return TrainConfig(
            chip=self.chip, batch=self.batch, steps_per_epoch=self.steps_per_epoch,
            max_epochs=self.max_epochs, patience=self.patience, seed=self.seed,
        )  # fmt: skip


def _scores_md(metrics: dict[str, Any]) -> str:
    h, b = metrics["heldout"], metrics["baseline_heldout"]
    rows = "\n".join(
        f"| {k} | {h[k]:.3f} | {b[k]:.3f} |"
        for k in ("iou", "f1", "precision", "recall", "specificity")
    )
    return "| held-out metric | U-Net | index baseline |\n|---|---|---|\n" + rows


@dg.asset(
    group_name="detect",
    kinds={"pytorch", "duckdb"},
    owners=["team:asmwatch"],
    deps=[dg.AssetDep(composite, partition_mapping=dg.AllPartitionMapping())],
    check_specs=specs("mining_model"),
    metadata=column_schema("models"),
    description=(
        "The mining segmentation model: a U-Net (segmentation-models-pytorch, ResNet-18 "
        "encoder, no pretrained weights) trained on the composites of regions with ground "
        "truth, the last period of each held out for evaluation. Reuses the registered "
        "model when its inputs are unchanged. Checkpoints under `models/<model_id>/`, "
        "records in the `models` view of the DuckDB catalog."
    ),
)
@fail_fast
def mining_model(
    context: dg.AssetExecutionContext,
    config: MiningModelConfig,
    settings: AsmwatchSettings,
    torch_device: TorchResource,
) -> dg.MaterializeResult:
    from ml import registry
    from pipelines.stages.detection import train_mining_model

    root = settings.root()
    regions = settings.regions().regions
    try:
        out = train_mining_model(
            root, regions, config=config.train_config(), device=torch_device.device,
            force=torch_device.retrain,
            progress=context.log.info,
        )  # fmt: skip
    except (ValueError, registry.RegistryError) as e:
        raise dg.Failure(allow_retries=False, description=str(e)) from e
    views = refresh_views(root, say=context.log.warning, regions=settings.regions().ids)
    r = out.record
    h, b = r.metrics["heldout"], r.metrics["baseline_heldout"]
    models = root / "models" / "models.parquet"
    return dg.MaterializeResult(
        check_results=table_checks(
            [("models", models, None)], regions[0], context.log, "model registry"
        ),
        metadata={
            **row_count(models),
            "model_id": str(r.model_id),
            "reused": bool(out.reused),
            "heldout_iou": float(h["iou"]),
            "threshold": float(r.metrics["threshold"]),
            "heldout_f1": float(h["f1"]),
            "heldout_precision": float(h["precision"]),
            "heldout_recall": float(h["recall"]),
            "baseline_heldout_iou": float(b["iou"]),
            "scores": dg.MetadataValue.md(_scores_md(r.metrics)),
            "validation_iou": float(r.metrics["validation"]["iou"]),
            "epochs": int(r.metrics["epochs"]),
            "best_epoch": int(r.metrics["best_epoch"]),
            "device": str(r.device),
            "training_seconds": float(r.seconds),
            "train_data": r.train_data,
            "input_hash": str(r.input_hash),
            "path": dg.MetadataValue.path(str(registry.checkpoint_file(root, r))),
            "catalog": views,
        },
    )


@dg.asset(
    partitions_def=REGION_PERIODS,
    group_name="detect",
    kinds={"pytorch", "cog"},
    owners=["team:asmwatch"],
    deps=[composite, mining_model],
    description=(
        "Per-pixel mining probability for a region and period: tiled, batched U-Net "
        "inference with overlap and blending (CUDA fp16 channels-last when a GPU is "
        "present, CPU otherwise). The region's `model` chooses it: `auto` takes a model "
        "trained on the region or on real imagery of its country, and refuses one trained "
        "only on simulated scenes for a real region; `none` is the spectral-index "
        "baseline; a registered chip classifier (`model: chips-...`) gives a SCREENING map "
        "of 240 m blocks (docs/detection.md). Processing tiles (settings.tile_px, 1024 px by "
        "default) read their "
        "composite windows and run as dask tasks (resource `dask`; in this process when "
        "the raster is one tile); the output does not depend on the tile size. A float32 "
        "COG at probability/{region}/{period}.tif, written block by block."
    ),
)
@fail_fast
def mining_probability(
    context: dg.AssetExecutionContext,
    settings: AsmwatchSettings,
    torch_device: TorchResource,
    dask: DaskResource,
) -> dg.MaterializeResult:
    from ml import registry
    from pipelines.stages.detection import DetectionError, choose_model, map_probability

    config = settings.regions()
    region, period = region_and_period(context, config)
    root = settings.root()
    try:
        choice = choose_model(root, region)
    except (DetectionError, registry.RegistryError) as e:
        raise dg.Failure(allow_retries=False, description=str(e)) from e
    record = choice.record
    said = f"mining_probability {region.id}/{period.id}: model {record.model_id if record else 'none'}: {choice.reason}"  # fmt: skip
    if record is None or "note:" in choice.reason or record.kind == "chips":
        context.log.warning(said)
    else:
        context.log.info(said)
    try:
        res = map_probability(
            root, region, period.id, record=record, device=torch_device.device, why=choice.reason,
            tile=torch_device.tile, overlap=torch_device.overlap, batch=torch_device.batch,
            dtype=torch_device.dtype, compile=torch_device.compile, tile_px=settings.tile_px,
            client=lambda: dask.client(log=context.log), progress=context.log.info,
        )  # fmt: skip
    except (ValueError, registry.RegistryError) as e:
        raise dg.Failure(allow_retries=False, description=str(e)) from e
    from pipelines.stages.reports import markdown_image, probability_preview

    meta: dict[str, Any] = {
        "path": dg.MetadataValue.path(str(res.path)),
        "preview": dg.MetadataValue.md(
            markdown_image(probability_preview(res.path), "mining probability (magma, 0-1)")
        ),
        "detector": str(res.detector),
        "model_choice": choice.reason,
        "model_domain": record.domain if record is not None else {"imagery": "none"},
        # A chip classifier's blocks (ml.chips): where mining may be, not its outline.
        "screening": bool(res.screening),
        "device": str(res.device),
        "mining_ha": float(res.mining_ha),
        "mining_fraction": float(round(res.mining_fraction, 5)),
        "mean_probability": float(round(res.mean_probability, 5)),
        "valid_fraction": float(round(res.valid_fraction, 5)),
        "seconds": float(round(res.seconds, 2)),
        "tiles": int(res.tiles),
        # settings, not measurements: one JSON entry, which the UI does not plot
        "settings": {"threshold": res.threshold, "tile_px": res.tile_px},
    }
    if res.metrics is not None:
        meta["truth_iou"] = float(res.metrics["iou"])
        meta["truth_ha"] = float(res.truth_ha or 0.0)
        meta["truth_metrics"] = res.metrics
    return dg.MaterializeResult(metadata=meta)


class AsmSitesConfig(dg.Config):
    """Polygonisation knobs; the threshold comes with the probability raster."""

    mmu_ha: float = MMU_HA  # minimum mapping unit, hectares (pipelines.thresholds)


@dg.asset(
    partitions_def=REGION_PERIODS,
    group_name="detect",
    kinds={"geoparquet", "duckdb"},
    owners=["team:asmwatch"],
    deps=[mining_probability],
    check_specs=specs("asm_sites"),
    metadata=column_schema("asm_sites"),
    description=(
        "ASM site polygons for a region and period: the probability thresholded at the "
        "model's recorded threshold, cleaned (opening, closing), components under the "
        "minimum mapping unit (0.5 ha) dropped, polygonised with rasterio.features, tile "
        "by tile (dask tasks, 8 px halo) with components that cross tile edges joined. "
        "GeoParquet (EPSG:4326, bbox covering) at `sites/<region>/<period>.parquet` and "
        "the `asm_sites` view. A region with `detections` in the regions file takes its "
        "sites from that file of external polygons instead (validated, clipped to the AOI)."
    ),
)
@fail_fast
def asm_sites(
    context: dg.AssetExecutionContext,
    config: AsmSitesConfig,
    settings: AsmwatchSettings,
    dask: DaskResource,
) -> dg.MaterializeResult:
    region, period = region_and_period(context, settings.regions())
    root = settings.root()
    try:
        made = sites_for_period(
            root, region, period.id, mmu_ha=config.mmu_ha, tile_px=settings.tile_px,
            client=lambda: dask.client(log=context.log), progress=context.log.info,
        )  # fmt: skip
    except MissingInputError as e:
        raise dg.Failure(description=str(e)) from e
    for note in made.notes:
        context.log.warning(f"asm_sites {region.id}: {note}")
    target = made.path
    import pyarrow.parquet as pq

    views = refresh_views(root, say=context.log.warning, regions=settings.regions().ids)
    # the figures from the file's area columns alone (the table is not held whole)
    areas = pq.read_table(target, columns=["area_ha", "mapped_area_ha"]).to_pandas()
    total = float(areas["area_ha"].sum()) if len(areas) else 0.0
    context.log.info(f"asm_sites {region.id} {period.id}: {len(areas)} sites, {total:.1f} ha")
    return dg.MaterializeResult(
        check_results=table_checks(
            [("asm_sites", target, None)], region, context.log, f"{region.id} {period.id}"
        ),
        metadata={
            "path": dg.MetadataValue.path(str(target)),
            **row_count(target),
            "site_count": len(areas),
            "total_area_ha": float(round(total, 2)),
            "largest_site_ha": float(areas["area_ha"].max()) if len(areas) else 0.0,
            "settings": {"mmu_ha": config.mmu_ha},  # not plotted
            "source": made.source,
            # The provider's own figure; unknown (null), not 0, when the file has none.
            "mapped_area_ha": (
                float(round(float(areas["mapped_area_ha"].sum()), 2)) if made.mapped_area else None
            ),
            "import_notes": "; ".join(made.notes) or "none",
            "empty": bool(len(areas) == 0),
            "catalog": views,
        },
    )
