-- region_summary: one row per region and period: mining area, the change by kind, and
-- growth factors against the previous and the first period of the region. Source:
-- <data root>/summary/<region>/<period>.parquet, written by the `asm_change` asset.
-- :files is replaced by the list of their files.
CREATE OR REPLACE VIEW region_summary AS
SELECT region, period, period_start, site_count, mining_ha, new_ha, expanded_ha,
       stable_ha, abandoned_ha, revegetating_ha, previous_period, previous_mining_ha,
       growth_vs_previous, first_period, first_mining_ha, growth_vs_first, notes
FROM read_parquet(:files, union_by_name = true)
ORDER BY region, period_start;
