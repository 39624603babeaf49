-- concession_risk: ASM-LSM conflict risk for each LSM concession of one region in one
-- period, with every component of the score stored beside it (docs/risk.md gives the
-- formula). Bound parameters only: $region, $period, $previous (the previous period id,
-- or NULL for the first), $period_end (DATE: grievances reported up to then count), and
-- $utm (the region's UTM CRS, in which distances and areas are measured), and the band
-- cut-offs of pipelines/thresholds.py: $band_critical, $band_high, $band_medium.
-- Distances use the GEOS functions: DuckDB spatial 1.5.5's own ST_Distance and ST_DWithin
-- return 0 / true for some disjoint polygons (edges on one line; duckdb-spatial #657,
-- #693), so the native ST_DWithin only pre-filters the join and ST_DWithin_GEOS decides.
WITH conc AS (
    SELECT feature_id AS concession_id, name, holder,
           ST_Transform(geometry, 'EPSG:4326', $utm, true) AS g
    FROM concessions WHERE region = $region
),
sites AS (
    SELECT period, ST_Transform(geometry, 'EPSG:4326', $utm, true) AS g
    FROM asm_sites WHERE region = $region AND (period = $period OR period = $previous)
),
fresh AS (
    SELECT ST_Transform(geometry, 'EPSG:4326', $utm, true) AS g
    FROM asm_change WHERE region = $region AND period = $period AND kind IN ('new', 'expanded')
),
-- Every site within 10 km of a concession, with its distance. The part of a site inside
-- the concession is measured exactly; the rest of it counts in the band of its nearest
-- point (sites are tens to hundreds of metres across, the bands kilometres wide).
pairs AS (
    SELECT c.concession_id, s.period, ST_Area(s.g) AS area,
           ST_Distance_GEOS(c.g, s.g) AS d,
           CASE WHEN ST_Intersects(c.g, s.g) THEN ST_Area(ST_Intersection(c.g, s.g)) ELSE 0 END AS inside
    FROM conc c JOIN sites s ON (ST_DWithin(c.g, s.g, 10000) AND ST_DWithin_GEOS(c.g, s.g, 10000))
),
reach AS (
    SELECT concession_id,
           sum(inside) FILTER (WHERE period = $period) AS a_in,
           sum(area - inside) FILTER (WHERE period = $period AND d <= 1000) AS a1,
           sum(area) FILTER (WHERE period = $period AND d > 1000 AND d <= 5000) AS a5,
           sum(area) FILTER (WHERE period = $period AND d > 5000) AS a10,
           sum(area) FILTER (WHERE period = $period) AS a_all,
           sum(area) FILTER (WHERE period = $previous) AS a_all_previous,
           min(d) FILTER (WHERE period = $period) AS nearest_asm_m
    FROM pairs
    GROUP BY concession_id
),
new_asm AS (
    SELECT c.concession_id, sum(ST_Area(f.g)) AS new_m2
    FROM conc c JOIN fresh f ON (ST_DWithin(c.g, f.g, 10000) AND ST_DWithin_GEOS(c.g, f.g, 10000))
    GROUP BY c.concession_id
),
people AS (
    SELECT c.concession_id, count(*) AS settlements_nearby
    FROM conc c JOIN settlements s ON s.region = $region
         AND (ST_DWithin(c.g, ST_Transform(s.geometry, 'EPSG:4326', $utm, true), 5000) AND ST_DWithin_GEOS(c.g, ST_Transform(s.geometry, 'EPSG:4326', $utm, true), 5000))
    GROUP BY c.concession_id
),
communities AS (
    SELECT c.concession_id, count(*) AS communities_nearby
    FROM conc c JOIN indigenous_lands i ON i.region = $region
         AND (ST_DWithin(c.g, ST_Transform(i.geometry, 'EPSG:4326', $utm, true), 5000) AND ST_DWithin_GEOS(c.g, ST_Transform(i.geometry, 'EPSG:4326', $utm, true), 5000))
    GROUP BY c.concession_id
),
complaints AS (
    SELECT c.concession_id, count(*) AS open_grievances
    FROM conc c JOIN grievances g ON g.region = $region
         AND lower(coalesce(g.status, 'open')) IN ('open', 'pending', 'unresolved', 'in progress')
         AND (g.date IS NULL OR g.date <= $period_end)
         AND (g.concession_id = c.concession_id
              OR (g.concession_id IS NULL
                  AND (ST_DWithin(c.g, ST_Transform(g.geometry, 'EPSG:4326', $utm, true), 5000) AND ST_DWithin_GEOS(c.g, ST_Transform(g.geometry, 'EPSG:4326', $utm, true), 5000))))
    GROUP BY c.concession_id
),
facts AS (
    SELECT c.concession_id, c.name, c.holder,
           coalesce(r.a_in, 0) / 1e4 AS asm_inside_ha,
           coalesce(r.a1, 0) / 1e4 AS asm_0_1km_ha,
           coalesce(r.a5, 0) / 1e4 AS asm_1_5km_ha,
           coalesce(r.a10, 0) / 1e4 AS asm_5_10km_ha,
           coalesce(n.new_m2, 0) / 1e4 AS new_asm_ha,
           CASE WHEN coalesce(r.a_all_previous, 0) > 0 THEN r.a_all / r.a_all_previous END AS growth_rate,
           r.nearest_asm_m,
           coalesce(p.settlements_nearby, 0) AS settlements_nearby,
           coalesce(m.communities_nearby, 0) AS communities_nearby,
           coalesce(q.open_grievances, 0) AS open_grievances
    FROM conc c
    LEFT JOIN reach r USING (concession_id)
    LEFT JOIN new_asm n USING (concession_id)
    LEFT JOIN people p USING (concession_id)
    LEFT JOIN communities m USING (concession_id)
    LEFT JOIN complaints q USING (concession_id)
),
scored AS (
    SELECT *,
           $max_inside * least(1, asm_inside_ha / 10) AS score_inside,
           $max_proximity * least(1, (asm_0_1km_ha + 0.5 * asm_1_5km_ha + 0.2 * asm_5_10km_ha) / 20) AS score_proximity,
           $max_new * least(1, new_asm_ha / 5) AS score_new,
           $max_growth * greatest(0, least(1, coalesce(growth_rate, 1) - 1)) AS score_growth,
           $max_people * least(1, (settlements_nearby + communities_nearby) / 3) AS score_people,
           $max_grievances * least(1, open_grievances / 3) AS score_grievances
    FROM facts
)
SELECT concession_id, $region AS region, $period AS period, name, holder,
       round(asm_inside_ha, 4) AS asm_inside_ha, round(asm_0_1km_ha, 4) AS asm_0_1km_ha,
       round(asm_1_5km_ha, 4) AS asm_1_5km_ha, round(asm_5_10km_ha, 4) AS asm_5_10km_ha,
       round(new_asm_ha, 4) AS new_asm_ha, round(growth_rate, 4) AS growth_rate,
       round(nearest_asm_m, 1) AS nearest_asm_m, settlements_nearby, communities_nearby,
       open_grievances,
       ri AS score_inside, rp AS score_proximity, rn AS score_new, rg AS score_growth,
       rpe AS score_people, rgr AS score_grievances,
       -- The score is the sum of the components as stored (2 decimals), so a reader who
       -- adds them up gets the score (to its 1 decimal); the band follows the same sum.
       round(ri + rp + rn + rg + rpe + rgr, 1) AS score,
       CASE WHEN ri + rp + rn + rg + rpe + rgr >= $band_critical THEN 'critical'
            WHEN ri + rp + rn + rg + rpe + rgr >= $band_high THEN 'high'
            WHEN ri + rp + rn + rg + rpe + rgr >= $band_medium THEN 'medium'
            ELSE 'low' END AS band
FROM (SELECT *, round(score_inside, 2) AS ri, round(score_proximity, 2) AS rp,
             round(score_new, 2) AS rn, round(score_growth, 2) AS rg,
             round(score_people, 2) AS rpe, round(score_grievances, 2) AS rgr
      FROM scored)
ORDER BY score DESC, concession_id;
