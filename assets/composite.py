"""The ``composite`` asset: a cloud-masked median composite per region and period.

No ``from __future__ import annotations`` here: Dagster inspects the context annotation.
"""

from typing import Any

import dagster as dg

from assets.partitions import REGION_PERIODS, region_and_period
from assets.resources import NETWORK_RETRY, AsmwatchSettings, DaskResource, StacResource, fail_fast
from assets.scenes import scenes
from pipelines.stages.composite import OUTPUT_BANDS, CompositeResult, composite_for_region
from pipelines.stages.reports import composite_preview, markdown_image

VALID_FRACTION_CHECK = "valid_fraction"


def _metadata(res: CompositeResult, threshold: float) -> dict[str, Any]:
    skipped = "\n".join(f"| {s.id} | {s.reason} |" for s in res.skipped)
    hist = "\n".join(f"| {k} | {v} |" for k, v in res.clear_count_histogram.items())
    preview = (
        dg.MetadataValue.md(
            markdown_image(composite_preview(res.path), "true colour (B04 B03 B02)")
        )
        if not res.empty and res.path.exists()
        else "empty composite"
    )
    return {
        "path": dg.MetadataValue.path(str(res.path)),
        "preview": preview,
        "empty": bool(res.empty),
        "valid_fraction": float(round(res.valid_fraction, 6)),
        "scene_count": len(res.scenes_used),
        "observations": int(res.observations),
        "skipped_count": len(res.skipped),
        "skipped_scenes": dg.MetadataValue.md(
            "| scene | reason |\n|---|---|\n" + skipped if skipped else "_none_"
        ),
        "read_failures": res.read_failures,
        "cloud_mask": str(res.cloud_mask),
        "l1c_scenes": int(res.l1c_scenes),
        "l1c_notes": res.l1c_notes,
        "clear_count": res.clear_count_stats,
        "clear_count_histogram": dg.MetadataValue.md(
            "| clear observations | pixels |\n|---|---|\n" + hist
        ),
        "band_means": res.band_means,
        "bands": list(OUTPUT_BANDS),
        "crs": str(f"EPSG:{res.epsg}"),
        # settings, not measurements: one JSON entry, which the UI does not plot
        "settings": ({"min_valid_fraction": threshold, "resolution_m": res.resolution}),
        "shape": list(res.shape),
        "size_mb": float(round(res.size_bytes / 2**20, 2)),
        "seconds": float(round(res.seconds, 2)),
    }


@dg.asset(
    partitions_def=REGION_PERIODS,
    group_name="ingest",
    kinds={"dask", "cog", "sentinel2"},
    owners=["team:asmwatch"],
    deps=[scenes],
    retry_policy=NETWORK_RETRY,
    check_specs=[
        dg.AssetCheckSpec(
            VALID_FRACTION_CHECK,
            asset="composite",
            blocking=True,
            description=(
                "The share of AOI pixels with at least one clear observation must reach "
                "the region's min_valid_fraction; a cloudier composite stops the "
                "detections built on it."
            ),
        )
    ],
    description=(
        "Cloud-masked (SCL 0, 1, 3, 8, 9, 10; optionally s2cloudless on the L1C twins) per-period median of B02 B03 B04 B08 B11 "
        "B12, a clear-observation count and NDVI, MNDWI and BSI, on the region's UTM "
        "grid at 10 m, built with odc-stac and dask. Lands as a tiled COG with overviews "
        "at `composite/<region>/<period>.tif`."
    ),
)
@fail_fast
def composite(
    context: dg.AssetExecutionContext,
    settings: AsmwatchSettings,
    dask: DaskResource,
    stac: StacResource,
) -> dg.MaterializeResult:
    config = settings.regions()
    region, period = region_and_period(context, config)
    client = dask.client(log=context.log)
    res = composite_for_region(
        region,
        period,
        settings.root(),
        client=client,
        chunk=dask.chunk_size,
        progress=context.log.info,
        pc_subscription_key=stac.pc_subscription_key or None,
    )
    threshold = region.min_valid_fraction
    passed = res.valid_fraction >= threshold
    if res.empty:
        why = f"no usable scenes for {region.id} {period.id}: the composite is empty"
    else:
        why = (
            f"{res.valid_fraction:.1%} of the AOI has a clear observation "
            f"({'>=' if passed else '<'} min_valid_fraction {threshold:.0%})"
        )
    context.log.info(f"composite {region.id} {period.id}: {why}")
    return dg.MaterializeResult(
        metadata=_metadata(res, threshold),
        check_results=[
            dg.AssetCheckResult(
                check_name=VALID_FRACTION_CHECK,
                passed=passed,
                severity=dg.AssetCheckSeverity.ERROR,
                description=why,
                metadata={
                    "valid_fraction": float(round(res.valid_fraction, 6)),
                    "min_valid_fraction": float(threshold),
                    "empty": bool(res.empty),
                },
            )
        ],
    )
