-- protected_area_pressure: ASM on each protected area and indigenous land of one region
-- in one period. Bound parameters only: $region, $period, and $utm, the region's UTM CRS
-- ('EPSG:32719') in which areas are measured. Reads the views asm_sites, asm_change,
-- protected_areas and indigenous_lands; pipelines/stages/risk.py runs it and writes the rows
-- to risk/protected_area_pressure/<region>/<period>.parquet.
WITH areas AS (
    SELECT feature_id AS area_id, 'protected' AS kind, name, category, area_ha, geometry
    FROM protected_areas WHERE region = $region
    UNION ALL
    SELECT feature_id AS area_id, 'indigenous' AS kind, name, category, area_ha, geometry
    FROM indigenous_lands WHERE region = $region
),
sites AS (
    SELECT site_id, area_ha, geometry FROM asm_sites
    WHERE region = $region AND period = $period
),
fresh AS (
    SELECT change_id, geometry FROM asm_change
    WHERE region = $region AND period = $period AND kind IN ('new', 'expanded')
),
on_sites AS (
    SELECT a.area_id, a.kind,
           count(*) AS site_count,
           sum(s.area_ha) AS intersecting_sites_ha,
           sum(ST_Area(ST_Transform(ST_Intersection(a.geometry, s.geometry),
                                    'EPSG:4326', $utm, true))) / 10000 AS asm_area_ha
    FROM areas a JOIN sites s ON ST_Intersects(a.geometry, s.geometry)
    GROUP BY a.area_id, a.kind
),
on_fresh AS (
    SELECT a.area_id, a.kind,
           sum(ST_Area(ST_Transform(ST_Intersection(a.geometry, f.geometry),
                                    'EPSG:4326', $utm, true))) / 10000 AS new_asm_ha
    FROM areas a JOIN fresh f ON ST_Intersects(a.geometry, f.geometry)
    GROUP BY a.area_id, a.kind
)
SELECT a.area_id, a.kind, $region AS region, $period AS period, a.name, a.category,
       a.area_ha,
       coalesce(s.site_count, 0) AS site_count,
       round(coalesce(s.asm_area_ha, 0), 4) AS asm_area_ha,
       round(coalesce(s.intersecting_sites_ha, 0), 4) AS intersecting_sites_ha,
       round(coalesce(f.new_asm_ha, 0), 4) AS new_asm_ha,
       coalesce(s.asm_area_ha, 0) / nullif(a.area_ha, 0) AS share_of_area
FROM areas a
LEFT JOIN on_sites s ON s.area_id = a.area_id AND s.kind = a.kind
LEFT JOIN on_fresh f ON f.area_id = a.area_id AND f.kind = a.kind
ORDER BY asm_area_ha DESC, a.kind, a.area_id;
