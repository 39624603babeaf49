-- hotspots: ASM and new ASM per H3 cell, region and period, with the cell polygon.
-- Source: <data root>/risk/hotspots/<region>/<period>.parquet (GeoParquet), written by
-- the `hotspots` asset from sql/hotspots.sql. :files is replaced by the list of their files.
CREATE OR REPLACE VIEW hotspots AS
SELECT h3_cell, region, period, resolution, asm_area_ha, new_asm_ha, site_count,
       geometry, bbox
FROM read_parquet(:files, union_by_name = true);
