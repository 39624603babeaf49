-- asm_sites: one row per ASM site polygon, per region and period.
-- Source: <data root>/sites/<region>/<period>.parquet (GeoParquet, EPSG:4326, bbox
-- covering column), written by the `asm_sites` asset. :files is replaced by their glob.
CREATE OR REPLACE VIEW asm_sites AS
SELECT site_id, region, period, area_ha, mean_probability, geometry, bbox
FROM read_parquet(:files, union_by_name = true);
