-- concession_risk: one row per LSM concession, region and period, the score and each of
-- its components (docs/risk.md). Source: <data root>/risk/concession_risk/<region>/
-- <period>.parquet, written by the `concession_risk` asset from sql/concession_risk.sql.
-- :files is replaced by the list of their files.
CREATE OR REPLACE VIEW concession_risk AS
SELECT * FROM read_parquet(:files, union_by_name = true);
