-- hotspots: ASM and new ASM per H3 cell for one region and period. Bound parameters only:
-- $region, $period, $resolution (H3 resolution, 7 by default: about 5 km2 cells). A
-- site's or change area's whole area counts in the cell of its representative point
-- (sites are far smaller than a cell). h3_cell(lat, lon, resolution) is the h3 package's
-- latlng_to_cell, registered by pipelines/stages/risk.py.
WITH pieces AS (
    SELECT h3_cell(ST_Y(ST_PointOnSurface(geometry)), ST_X(ST_PointOnSurface(geometry)),
                   $resolution) AS h3_cell,
           area_ha AS asm_ha, 0.0 AS new_ha, 1 AS site
    FROM asm_sites WHERE region = $region AND period = $period
    UNION ALL
    SELECT h3_cell(ST_Y(ST_PointOnSurface(geometry)), ST_X(ST_PointOnSurface(geometry)),
                   $resolution),
           0.0, area_ha, 0
    FROM asm_change
    WHERE region = $region AND period = $period AND kind IN ('new', 'expanded')
)
SELECT h3_cell, $region AS region, $period AS period, $resolution AS resolution,
       round(sum(asm_ha), 4) AS asm_area_ha, round(sum(new_ha), 4) AS new_asm_ha,
       sum(site)::INTEGER AS site_count
FROM pieces
GROUP BY h3_cell
ORDER BY asm_area_ha DESC, h3_cell;
