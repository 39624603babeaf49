-- asm_change: one row per area of change, per region and period (kinds: new, expanded,
-- stable, abandoned, revegetating). Source: <data root>/change/<region>/<period>.parquet
-- (GeoParquet, EPSG:4326, bbox covering column), written by the `asm_change` asset.
-- :files is replaced by the list of their files.
CREATE OR REPLACE VIEW asm_change AS
SELECT change_id, region, period, kind, area_ha, first_seen_period, site_id, mean_ndvi,
       geometry, bbox
FROM read_parquet(:files, union_by_name = true);
