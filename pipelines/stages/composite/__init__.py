"""The composite stage: cloud-masked per-period median composites built with dask.

Third step of the flow (STAC -> scenes -> **composite** -> probability -> sites). Input:
the normalised scene items of a region and period (``scenes/<region>/<period>.parquet``).
Output: one tiled, deflated COG with overviews at ``composite/<region>/<period>.tif`` on
the region's UTM grid at 10 m, bands in this order:

    B02 B03 B04 B08 B11 B12   median surface reflectance of the clear observations
    clear_count               number of clear observations (0 where none)
    NDVI MNDWI BSI            indices computed from the median bands

How, and why this way:

* odc-stac loads every scene onto one GeoBox (the UTM zone of the AOI's centre, so a
  region spanning two zones or several MGRS tiles gets one grid). Reflectance bands are
  resampled bilinearly (20 m B11/B12 to 10 m), SCL by nearest neighbour. Scenes of the
  same pass (same solar day, same offset) are fused into one observation.
* The mask is Sen2Cor's SCL: 0 nodata, 1 saturated/defective, 3 cloud shadow, 8 and 9
  cloud, 10 thin cirrus are never used.
* Raw DN stay uint16 through the reduction; each scene's scale/offset is applied by
  shifting its DN onto one offset (``pipelines.stages.composite.median``), and reflectance is
  ``median_dn * scale + offset`` at the end.
* Chunks are square in space and whole in time, so each dask task holds one block of
  every scene and memory stays bounded by the chunk size, not by the AOI.
* A scene whose files are missing or unreadable is skipped, named in the result, and
  the composite still lands; a period with no scenes writes an all-nodata composite
  marked ``empty``.

The package, by concern: ``inputs`` (bands, grid, scene files, signing, GDAL settings),
``load`` (odc-stac onto the grid; block sizes), ``reduce`` (the median kernel per block)
and ``write`` (blocks to a COG; the stage end to end).
"""

from pipelines.stages.composite.inputs import (
    BAND_DESCRIPTIONS,
    BAND_ROLES,
    CLOUD_MASKS,
    COUNT_BAND,
    DEFAULT_CHUNK,
    DEFAULT_RESOLUTION,
    GDAL_LOGGERS,
    GROUP_PROPERTY,
    INDEX_BANDS,
    L1C_ROLES,
    LOAD_ROLES,
    MASKED_SCL,
    OUTPUT_BANDS,
    REFLECTANCE_BANDS,
    REMOTE_GDAL,
    CompositeError,
    CompositeResult,
    Observation,
    SkippedScene,
    aoi_mask,
    aws_signed,
    check_scene_files,
    plan_observations,
    read_scene_items,
    redact,
    region_geobox,
    remote_gdal,
)
from pipelines.stages.composite.load import (
    load_stack,
    safe_chunk,
    task_bytes,
)
from pipelines.stages.composite.read import StackPlan, composite_task, plan_stack, read_block
from pipelines.stages.composite.reduce import (
    _s2cloudless_block,
    clear_mask,
    composite_array,
    composite_block,
    naive_composite,
)
from pipelines.stages.composite.write import (
    build_composite,
    composite_for_region,
    compute_plan,
    write_composite,
)

__all__ = [
    "BAND_DESCRIPTIONS",
    "BAND_ROLES",
    "CLOUD_MASKS",
    "COUNT_BAND",
    "DEFAULT_CHUNK",
    "DEFAULT_RESOLUTION",
    "GDAL_LOGGERS",
    "GROUP_PROPERTY",
    "INDEX_BANDS",
    "L1C_ROLES",
    "LOAD_ROLES",
    "MASKED_SCL",
    "OUTPUT_BANDS",
    "REFLECTANCE_BANDS",
    "REMOTE_GDAL",
    "CompositeError",
    "CompositeResult",
    "Observation",
    "SkippedScene",
    "StackPlan",
    "_s2cloudless_block",
    "aoi_mask",
    "aws_signed",
    "build_composite",
    "check_scene_files",
    "clear_mask",
    "composite_array",
    "composite_block",
    "composite_for_region",
    "composite_task",
    "compute_plan",
    "load_stack",
    "naive_composite",
    "plan_observations",
    "plan_stack",
    "read_block",
    "read_scene_items",
    "redact",
    "region_geobox",
    "remote_gdal",
    "safe_chunk",
    "task_bytes",
    "write_composite",
]
