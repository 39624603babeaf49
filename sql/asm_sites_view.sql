-- asm_sites: one row per ASM site polygon, per region and period.
-- Source: <data root>/sites/<region>/<period>.parquet (GeoParquet, EPSG:4326, bbox
-- covering column), written by the `asm_sites` asset from the model's probability map
-- or from imported detections (source says which). :files is replaced by the list of their files.
CREATE OR REPLACE VIEW asm_sites AS
SELECT site_id, region, period, area_ha, mean_probability, mapped_area_ha,
       first_seen_period, source, geometry, bbox
FROM read_parquet(:files, union_by_name = true);
