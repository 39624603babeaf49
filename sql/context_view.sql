-- One view per context layer (protected_areas, indigenous_lands, concessions,
-- settlements, rivers, grievances): the layer's rows of every region. Source:
-- <data root>/context/<region>/<layer>.parquet (GeoParquet, EPSG:4326, bbox covering
-- column), written by the `context_layers` asset. :view is the layer name (a constant of
-- pipelines/stages/catalog.py, never user input); :files is replaced by the list of the files.
CREATE OR REPLACE VIEW :view AS
SELECT region, layer, feature_id, name, category, area_ha, holder, status, population,
       CAST(date AS DATE) AS date, place, concession_id, attributes, source_file,
       geometry, bbox
FROM read_parquet(:files, union_by_name = true);
