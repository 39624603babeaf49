-- models: one row per registered mining model (the model registry).
-- Source: <data root>/models/models.parquet, written by the `mining_model` asset;
-- checkpoints live at `path`, relative to the data root. :files is replaced by the file.
CREATE OR REPLACE VIEW models AS
SELECT
    model_id,
    CAST(created_at AS TIMESTAMPTZ) AS created_at,
    kind,
    input_hash,
    path,
    device,
    seconds,
    CAST(train_data AS JSON) AS train_data,
    CAST(metrics AS JSON) AS metrics,
    CAST(config AS JSON) AS config,
    CAST(json_extract(metrics, '$.heldout.iou') AS DOUBLE) AS heldout_iou,
    CAST(json_extract(metrics, '$.baseline_heldout.iou') AS DOUBLE) AS baseline_heldout_iou
FROM read_parquet(:files);
