-- alert_features: what raised each alert, one row per change area and feature: a new or
-- expanded ASM area of asm_change inside or within $alert_distance_m of an LSM
-- concession, or inside a protected area or an indigenous land. sql/alerts.sql groups
-- these rows into one alert per change area (the event a person acts on); analysts and
-- per-concession views keep them here. Bound parameters only: $region, $period, $utm
-- (the region's UTM CRS), $alert_distance_m (DOUBLE), $min_alert_ha (DOUBLE: smaller
-- change areas, below the minimum mapping unit, raise nothing), $previous (the previous
-- period; a region's first period is its baseline, where all mining counts as new, and
-- raises no alerts), $created_at (TIMESTAMP of the run), and the severity rules of
-- pipelines/thresholds.py: $alert_high_within_m, $alert_critical_ha, $alert_high_ha.
-- alert_id is a digest of region, period and change area: the alert a row belongs to,
-- the same in a re-run (the period's files are replaced, never added to).
-- Distances use the GEOS functions: DuckDB spatial 1.5.5's own ST_Distance and ST_DWithin
-- return 0 / true for some disjoint polygons (edges on one line; duckdb-spatial #657,
-- #693), so the native ST_DWithin only pre-filters the join and ST_DWithin_GEOS decides.
WITH fresh AS (
    SELECT change_id, kind AS change_kind, area_ha AS change_ha, geometry,
           ST_Transform(geometry, 'EPSG:4326', $utm, true) AS g
    FROM asm_change
    WHERE region = $region AND period = $period AND kind IN ('new', 'expanded')
      AND area_ha >= $min_alert_ha AND $previous IS NOT NULL
),
concession AS (
    SELECT f.change_id, f.change_kind, f.change_ha, 'concessions' AS feature_layer,
           c.feature_id, c.name AS feature_name,
           ST_Distance_GEOS(f.g, ST_Transform(c.geometry, 'EPSG:4326', $utm, true)) AS distance_m,
           ST_Area(ST_Intersection(f.g, ST_Transform(c.geometry, 'EPSG:4326', $utm, true))) / 1e4 AS overlap_ha,
           f.geometry
    FROM fresh f JOIN concessions c ON c.region = $region
         AND (ST_DWithin(f.g, ST_Transform(c.geometry, 'EPSG:4326', $utm, true), $alert_distance_m) AND ST_DWithin_GEOS(f.g, ST_Transform(c.geometry, 'EPSG:4326', $utm, true), $alert_distance_m))
),
protected AS (
    SELECT f.change_id, f.change_kind, f.change_ha, a.layer AS feature_layer, a.feature_id,
           a.name AS feature_name, 0.0 AS distance_m,
           ST_Area(ST_Intersection(f.g, ST_Transform(a.geometry, 'EPSG:4326', $utm, true))) / 1e4 AS overlap_ha,
           f.geometry
    FROM fresh f JOIN (
        SELECT layer, feature_id, name, geometry FROM protected_areas WHERE region = $region
        UNION ALL
        SELECT layer, feature_id, name, geometry FROM indigenous_lands WHERE region = $region
    ) a ON ST_Intersects(f.geometry, a.geometry)
),
relations AS (
    SELECT *, CASE WHEN distance_m = 0 THEN 'in_concession' ELSE 'near_concession' END AS kind,
           CASE WHEN distance_m = 0 THEN 'inside' ELSE 'within' END AS relation,
           CASE WHEN distance_m = 0 THEN 'critical'
                WHEN distance_m <= $alert_high_within_m THEN 'high' ELSE 'medium' END AS severity
    FROM concession
    UNION ALL BY NAME
    SELECT *, CASE feature_layer WHEN 'protected_areas' THEN 'in_protected_area'
                                 ELSE 'in_indigenous_land' END AS kind,
           'inside' AS relation,
           CASE WHEN overlap_ha >= $alert_critical_ha THEN 'critical'
                WHEN overlap_ha >= $alert_high_ha THEN 'high' ELSE 'medium' END AS severity
    FROM protected WHERE overlap_ha > 0
)
SELECT md5(concat_ws('|', $region, $period, change_id)) AS alert_id,
       $region AS region, $period AS period, change_id, change_kind,
       round(change_ha, 4) AS change_ha, kind, relation, severity,
       feature_layer, feature_id, feature_name,
       round(distance_m, 1) AS distance_m,
       CASE WHEN relation = 'inside' THEN round(overlap_ha, 4) END AS overlap_ha,
       $created_at AS created_at, ST_AsWKB(geometry) AS geometry
FROM relations
ORDER BY alert_id, CASE severity WHEN 'critical' THEN 0 WHEN 'high' THEN 1 ELSE 2 END,
         distance_m, feature_layer, feature_id;
