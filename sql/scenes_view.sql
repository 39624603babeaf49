-- scenes: one row per normalised Sentinel-2 L2A scene, per region and period.
-- Source: the stac-geoparquet files written by the `scenes` asset
-- (<data root>/scenes/<region>/<period>.parquet). :files is replaced by the list of
-- their files, quoted; DuckDB views take no bound parameters. Asset hrefs of files
-- under the data root (the embedded world) are relative to the scenes file.
-- See docs/data-dictionary.md.
CREATE OR REPLACE VIEW scenes AS
SELECT
    "asmwatch:region" AS region,
    "asmwatch:period" AS period,
    id,
    collection,
    datetime,
    "s2:mgrs_tile" AS mgrs_tile,
    "eo:cloud_cover" AS cloud_cover,
    "s2:processing_baseline" AS processing_baseline,
    platform,
    "proj:epsg" AS epsg,
    MAP {
        'blue': assets.blue.href, 'green': assets.green.href, 'red': assets.red.href,
        'nir': assets.nir.href, 'swir16': assets.swir16.href, 'swir22': assets.swir22.href,
        'scl': assets.scl.href
    } AS assets,
    MAP {
        'blue': assets.blue."raster:bands"[1].scale,
        'green': assets.green."raster:bands"[1].scale,
        'red': assets.red."raster:bands"[1].scale,
        'nir': assets.nir."raster:bands"[1].scale,
        'swir16': assets.swir16."raster:bands"[1].scale,
        'swir22': assets.swir22."raster:bands"[1].scale
    } AS scale,
    MAP {
        'blue': assets.blue."raster:bands"[1]."offset",
        'green': assets.green."raster:bands"[1]."offset",
        'red': assets.red."raster:bands"[1]."offset",
        'nir': assets.nir."raster:bands"[1]."offset",
        'swir16': assets.swir16."raster:bands"[1]."offset",
        'swir22': assets.swir22."raster:bands"[1]."offset"
    } AS "offset",
    bbox,
    geometry
FROM read_parquet(:files, union_by_name = true);
