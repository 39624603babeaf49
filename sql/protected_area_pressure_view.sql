-- protected_area_pressure: one row per protected area or indigenous land, region and
-- period. Source: <data root>/risk/protected_area_pressure/<region>/<period>.parquet,
-- written by the `protected_area_pressure` asset from sql/protected_area_pressure.sql.
-- :files is replaced by the list of their files.
CREATE OR REPLACE VIEW protected_area_pressure AS
SELECT area_id, kind, region, period, name, category, area_ha, site_count, asm_area_ha,
       intersecting_sites_ha, new_asm_ha, share_of_area
FROM read_parquet(:files, union_by_name = true);
