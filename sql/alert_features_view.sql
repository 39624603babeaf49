-- alert_features: what raised each alert, one row per alert and feature (concession,
-- protected area, indigenous land) with its relation (inside, or within distance_m) and
-- that relation's severity. Source: <data root>/risk/alert_features/<region>/<period>.parquet
-- (GeoParquet: the change area's geometry), written with the alerts by the `alerts`
-- asset from sql/alert_features.sql. :files is replaced by the list of their files.
CREATE OR REPLACE VIEW alert_features AS
SELECT alert_id, region, period, change_id, change_kind, change_ha, kind, relation,
       severity, feature_layer, feature_id, feature_name, distance_m, overlap_ha,
       created_at, geometry, bbox
FROM read_parquet(:files, union_by_name = true);
