"""asmwatch's torch side: models, chip datasets, training, tiled inference, metrics.

No Dagster import here. The segmentation model lands with issue 4.
"""
