-- alerts: early warnings per region and period, one per change area (new ASM inside or
-- near a concession, inside a protected area or an indigenous land), ranked by severity
-- then area. Source: <data root>/risk/alerts/<region>/<period>.parquet (GeoParquet),
-- written by the `alerts` asset from sql/alerts.sql. What raised each one, feature by
-- feature: the alert_features view. :files is replaced by the list of their files.
CREATE OR REPLACE VIEW alerts AS
SELECT alert_id, alert_ref, region, period, rank, listed, severity, change_id, change_kind,
       area_ha, kinds, feature_count, concessions, protected_areas, indigenous_lands,
       nearest_concession_m, summary, created_at, geometry, bbox
FROM read_parquet(:files, union_by_name = true);
