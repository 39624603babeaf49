-- alerts: early warnings for one region and period: new ASM (new and expanded areas of
-- asm_change) within $alert_distance_m of an LSM concession, or inside a protected area
-- or an indigenous land. Bound parameters only: $region, $period, $utm (the region's UTM
-- CRS), $alert_distance_m (DOUBLE), $min_alert_ha (DOUBLE: smaller change areas, edge
-- noise of a 10 m grid, raise nothing), $previous (the previous period; a region's first
-- period is its baseline, where all mining counts as new, and raises no alerts),
-- $created_at (TIMESTAMP of the run), and the severity rules of pipelines/thresholds.py:
-- $alert_high_within_m, $alert_critical_ha, $alert_high_ha. alert_id is a
-- digest of region, period, kind, change and feature: a re-run gives the same ids, and
-- the period's file is replaced, so alerts are never duplicated.
-- Distances use the GEOS functions: DuckDB spatial 1.5.5's own ST_Distance and ST_DWithin
-- return 0 / true for some disjoint polygons (edges on one line; duckdb-spatial #657,
-- #693), so the native ST_DWithin only pre-filters the join and ST_DWithin_GEOS decides.
WITH fresh AS (
    SELECT change_id, geometry, ST_Transform(geometry, 'EPSG:4326', $utm, true) AS g
    FROM asm_change
    WHERE region = $region AND period = $period AND kind IN ('new', 'expanded')
      AND area_ha >= $min_alert_ha AND $previous IS NOT NULL
),
near_concession AS (
    SELECT 'near_concession' AS kind, f.change_id, 'concessions' AS feature_layer,
           c.feature_id, c.name AS feature_name,
           ST_Distance_GEOS(f.g, ST_Transform(c.geometry, 'EPSG:4326', $utm, true)) AS distance_m,
           ST_Area(f.g) / 1e4 AS area_ha, f.geometry
    FROM fresh f JOIN concessions c ON c.region = $region
         AND (ST_DWithin(f.g, ST_Transform(c.geometry, 'EPSG:4326', $utm, true), $alert_distance_m) AND ST_DWithin_GEOS(f.g, ST_Transform(c.geometry, 'EPSG:4326', $utm, true), $alert_distance_m))
),
inside AS (
    SELECT CASE a.layer WHEN 'protected_areas' THEN 'in_protected_area'
                        ELSE 'in_indigenous_land' END AS kind,
           f.change_id, a.layer AS feature_layer, a.feature_id, a.name AS feature_name,
           0.0 AS distance_m,
           ST_Area(ST_Intersection(f.g, ST_Transform(a.geometry, 'EPSG:4326', $utm, true))) / 1e4 AS area_ha,
           f.geometry
    FROM fresh f JOIN (
        SELECT layer, feature_id, name, geometry FROM protected_areas WHERE region = $region
        UNION ALL
        SELECT layer, feature_id, name, geometry FROM indigenous_lands WHERE region = $region
    ) a ON ST_Intersects(f.geometry, a.geometry)
),
raised AS (
    SELECT * FROM near_concession
    UNION ALL
    SELECT * FROM inside WHERE area_ha > 0
)
SELECT md5(concat_ws('|', $region, $period, kind, change_id, feature_layer, feature_id)) AS alert_id,
       $region AS region, $period AS period, kind,
       CASE WHEN kind = 'near_concession' THEN
                CASE WHEN distance_m = 0 THEN 'critical'
                     WHEN distance_m <= $alert_high_within_m THEN 'high' ELSE 'medium' END
            ELSE CASE WHEN area_ha >= $alert_critical_ha THEN 'critical'
                      WHEN area_ha >= $alert_high_ha THEN 'high' ELSE 'medium' END
       END AS severity,
       change_id, feature_layer, feature_id, feature_name,
       round(distance_m, 1) AS distance_m, round(area_ha, 4) AS area_ha,
       $created_at AS created_at, ST_AsWKB(geometry) AS geometry
FROM raised
ORDER BY CASE severity WHEN 'critical' THEN 0 WHEN 'high' THEN 1 ELSE 2 END, alert_id;
