-- alerts: early warnings for one region and period, one per change area (the event a
-- person acts on): a new or expanded ASM area inside or near an LSM concession, or
-- inside a protected area or an indigenous land. Its rows come from the relations of
-- sql/alert_features.sql (the temporary table alert_relations, one row per change area
-- and feature): the alert lists every feature it touches with its relation (`summary`,
-- in words; counts per layer), its severity is the most serious relation's, and alerts
-- are ranked by severity, then area. `alert_ref` (<period>-<rank>) is the reference a
-- reader quotes; `listed`: within the first $max_alerts, the ones the report and the map
-- show (the rest are counted there). Bound parameter: $max_alerts.
WITH described AS (
    SELECT *,
           CASE severity WHEN 'critical' THEN 0 WHEN 'high' THEN 1 ELSE 2 END AS sev,
           CASE WHEN relation = 'inside'
                THEN 'inside ' || coalesce(feature_name, feature_id) || ' ('
                     || replace(rtrim(feature_layer, 's'), '_', ' ') || ', '
                     || printf('%.2f', overlap_ha) || ' ha)'
                ELSE printf('%.0f', distance_m) || ' m from '
                     || replace(rtrim(feature_layer, 's'), '_', ' ') || ' '
                     || coalesce(feature_name, feature_id)
           END AS said
    FROM alert_relations
),
events AS (
    SELECT alert_id, any_value(region) AS region, any_value(period) AS period,
           any_value(change_id) AS change_id, any_value(change_kind) AS change_kind,
           any_value(change_ha) AS area_ha, min(sev) AS sev,
           list_sort(list_distinct(list(kind))) AS kinds,
           count(*) AS feature_count,
           count(*) FILTER (WHERE feature_layer = 'concessions') AS concessions,
           count(*) FILTER (WHERE feature_layer = 'protected_areas') AS protected_areas,
           count(*) FILTER (WHERE feature_layer = 'indigenous_lands') AS indigenous_lands,
           min(distance_m) FILTER (WHERE feature_layer = 'concessions') AS nearest_concession_m,
           string_agg(said, '; ' ORDER BY sev, distance_m, feature_layer, feature_id) AS summary,
           any_value(created_at) AS created_at, any_value(geometry) AS geometry
    FROM described GROUP BY alert_id
),
ranked AS (
    SELECT *, row_number() OVER (ORDER BY sev, area_ha DESC, alert_id) AS rank FROM events
)
SELECT alert_id, printf('%s-%03d', period, rank) AS alert_ref, region, period, rank,
       rank <= $max_alerts AS listed,
       CASE sev WHEN 0 THEN 'critical' WHEN 1 THEN 'high' ELSE 'medium' END AS severity,
       change_id, change_kind, area_ha, kinds, feature_count, concessions, protected_areas,
       indigenous_lands, nearest_concession_m,
       change_kind || ', ' || printf('%.2f', area_ha) || ' ha: ' || summary AS summary,
       created_at, geometry
FROM ranked
ORDER BY rank;
