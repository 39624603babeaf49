"""asmwatch's Dagster layer: definitions, resources, partitions and one module per stage.

Thin by design: each asset reads its partition, calls one pipelines/ function, writes
through the storage helpers and returns metadata.
"""
