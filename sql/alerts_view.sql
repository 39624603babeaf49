-- alerts: early warnings per region and period (new ASM near a concession, inside a
-- protected area or an indigenous land). Source: <data root>/risk/alerts/<region>/
-- <period>.parquet (GeoParquet), written by the `alerts` asset from sql/alerts.sql.
-- :files is replaced by the list of their files.
CREATE OR REPLACE VIEW alerts AS
SELECT alert_id, region, period, kind, severity, change_id, feature_layer, feature_id,
       feature_name, distance_m, area_ha, created_at, geometry, bbox
FROM read_parquet(:files, union_by_name = true);
