"""The stages of the flow, in order: each turns one partition's inputs into its outputs.

``stac`` (search and normalise scenes) -> ``scenes`` (the scenes table) ->
``composite`` (cloud-masked median, with ``median`` and ``cloudmask`` inside) ->
``detection`` (the model, and probability maps) -> ``sites`` (or ``imports``:
detections from elsewhere) -> ``change`` -> ``context`` (protected areas, lands,
concessions, ...) -> ``risk`` (the SQL of sql/) -> ``catalog`` (DuckDB views) ->
``reports``; ``export`` writes a region's tables for desktop GIS. Stages find each
other's files through ``pipelines.infra.layout``, never by importing each other.
"""
