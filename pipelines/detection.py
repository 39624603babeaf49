"""The detection stage: train the mining model, and map mining probability per period.

Fourth step of the flow (composite -> **probability** -> sites). Training data are the
composites of regions that have ground truth: the embedded world's truth masks in the
demo (``embedded/<region>/truth/<period>.tif``); label rasters or polygons of real
regions come the same way. The last period of each such region is held out: the model
never sees it, and its IoU, F1, precision and recall against the truth (with those of
the index baseline beside them) are the figures the model is registered with. Within
the training periods, the eastern quarter of the AOI is the validation strip that early
stopping watches.

Output of ``map_probability``: ``probability/<region>/<period>.tif``, a COG of float32
mining probability (NaN where the composite has no clear look), from the latest
registered U-Net, or from the index baseline when no model exists.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import rasterio
from rasterio._err import CPLE_BaseError  # GDAL's errors, raised as they come

from ml import registry
from ml.features import IGNORE, Normalizer, Scene, read_composite, read_labels
from ml.infer import pick_device, plan_tiles, predict_tiled
from ml.metrics import best_threshold, confusion, evaluate, scores
from ml.models import index_baseline
from ml.train import Labelled, TrainConfig, train_unet
from pipelines.composite import composite_path
from pipelines.embedded import context_path, world_dir
from pipelines.errors import first_line
from pipelines.progress import Progress
from pipelines.regions import Region
from pipelines.storage import atomic_path, partition_path

VAL_FRACTION = 0.25  # eastern share of each training scene kept for early stopping
THRESHOLD = 0.5  # for the index baseline, and for models registered without one
# (tile edge, tiles per forward pass) when not configured: small tiles keep CPU memory
# low; on a GPU, large tiles waste less on overlap (docs/performance.md).
INFER_DEFAULTS = {"cpu": (256, 16), "cuda": (2048, 6)}


class DetectionError(ValueError):
    """Missing or unusable inputs; the message names them and what to run first."""


@dataclass(frozen=True)
class TrainingScene:
    region: str
    period: str
    composite: Path
    labels: Path
    heldout: bool


@dataclass
class ModelOutcome:
    record: registry.ModelRecord
    reused: bool
    messages: list[str] = field(default_factory=list)


def probability_path(root: Path, region_id: str, period_id: str) -> Path:
    return partition_path(root, "probability", region_id, period_id, ".tif")


def training_scenes(root: Path, regions: Sequence[Region]) -> list[TrainingScene]:
    """Composites with truth: every period of each embedded region, the last held out."""
    out = []
    for region in regions:
        polygons = context_path(root, region, "mining_labels")
        if (region.source != "embedded" and polygons is None) or len(region.periods) < 2:
            continue
        for i, period in enumerate(region.periods):
            truth = world_dir(root, region) / "truth" / f"{period.id}.tif"
            out.append(
                TrainingScene(
                    region=region.id,
                    period=period.id,
                    composite=composite_path(root, region.id, period.id),
                    labels=polygons if polygons is not None else truth,
                    heldout=i == len(region.periods) - 1,
                )
            )
    if not out:
        raise DetectionError(
            "no labelled training data: the model trains on regions with ground truth "
            "(source: embedded, or a `mining_labels` polygon layer in context) and at "
            "least two periods"
        )
    missing = [s for s in out if not s.composite.exists() or not s.labels.exists()]
    if missing:
        names = ", ".join(f"{s.region}/{s.period}" for s in missing)
        raise DetectionError(
            f"training inputs missing for {names}: materialise `composite` for those "
            "partitions first (labels come with the embedded world)"
        )
    return out


def _describe(root: Path, s: TrainingScene) -> dict[str, str]:
    def rel(p: Path) -> str:  # relative to the data root where it lies inside it
        return p.relative_to(root).as_posix() if p.is_relative_to(root) else str(p)

    return {
        "region": s.region,
        "period": s.period,
        "role": "heldout" if s.heldout else "train",
        "composite": rel(s.composite),
        "labels": rel(s.labels),
    }


def _labels(scene: TrainingScene, comp: Scene) -> npt.NDArray[np.uint8]:
    return read_labels(scene.labels, comp, period=scene.period)


def train_mining_model(
    root: Path,
    regions: Sequence[Region],
    *,
    config: TrainConfig | None = None,
    device: str = "auto",
    force: bool = False,
    progress: Callable[[str], None] = print,
) -> ModelOutcome:
    """Train (or reuse) the U-Net on the labelled composites; register it with metrics."""
    cfg = config or TrainConfig()
    scenes = training_scenes(root, regions)
    files = [p for s in scenes for p in (s.composite, s.labels)]
    key = registry.input_hash(files, {**cfg.to_dict(), "val_fraction": VAL_FRACTION})
    if not force and (hit := registry.find(root, key)) is not None:
        progress(f"mining_model: inputs unchanged (hash {key}); reusing {hit.model_id}")
        return ModelOutcome(record=hit, reused=True)

    train_scenes = [s for s in scenes if not s.heldout]
    test_scenes = [s for s in scenes if s.heldout]
    comps = [read_composite(s.composite) for s in train_scenes]  # each file read once
    norm = Normalizer.fit([c.features[:, c.valid] for c in comps])
    train, val = [], []
    for s, comp in zip(train_scenes, comps, strict=True):
        x, y = norm.apply(comp.features), _labels(s, comp)
        cut = int(x.shape[2] * (1 - VAL_FRACTION))
        y_train = y.copy()
        y_train[:, cut:] = IGNORE
        train.append(Labelled(f"{s.region}/{s.period}", x, y_train))
        val.append(Labelled(f"{s.region}/{s.period}:val", x[:, :, cut:].copy(), y[:, cut:].copy()))
    dev = pick_device(device)
    progress(
        f"mining_model: training a U-Net ({cfg.spec.encoder}) on {len(train)} composite(s) "
        f"[{', '.join(t.name for t in train)}] on {dev}; held out: "
        f"{', '.join(f'{s.region}/{s.period}' for s in test_scenes)}"
    )
    result = train_unet(train, val, cfg, device=dev, progress=progress)
    # The decision threshold is chosen on the validation strips, never on held-out data.
    val_probs = [
        (predict_tiled(result.model, v.x, tile=128, overlap=16, device=dev), v.y) for v in val
    ]
    threshold, val_iou = best_threshold(val_probs)
    progress(f"mining_model: threshold {threshold} (validation IoU {val_iou:.3f})")

    unet_cm = np.zeros(4, np.int64)
    base_cm = np.zeros(4, np.int64)
    per_scene = {}
    for s in test_scenes:
        comp = read_composite(s.composite)
        y = _labels(s, comp)
        prob = predict_tiled(result.model, comp.features, normalizer=norm, device=dev)
        base = index_baseline(comp.features)
        unet_cm += np.asarray(confusion(prob, y, threshold))
        base_cm += np.asarray(confusion(base, y, THRESHOLD))
        per_scene[f"{s.region}/{s.period}"] = {
            "unet": evaluate(prob, y, threshold),
            "baseline": evaluate(base, y, THRESHOLD),
        }
    metrics: dict[str, Any] = {
        "heldout": scores(*(int(v) for v in unet_cm)),
        "baseline_heldout": scores(*(int(v) for v in base_cm)),
        "heldout_scenes": per_scene,
        "validation": result.best_val,
        "best_epoch": result.best_epoch,
        "epochs": result.epochs,
        "threshold": threshold,
        "baseline_threshold": THRESHOLD,
    }
    record = registry.register(
        root,
        result.model,
        cfg.spec,
        norm,
        input_hash_=key,
        device=result.device,
        seconds=result.seconds,
        train_data=[_describe(root, s) for s in scenes],
        metrics=metrics,
        config={**cfg.to_dict(), "val_fraction": VAL_FRACTION},
    )
    h, b = record.metrics["heldout"], record.metrics["baseline_heldout"]
    progress(
        f"mining_model: {record.model_id} held-out IoU {h['iou']:.3f} (index baseline "
        f"{b['iou']:.3f}), F1 {h['f1']:.3f}, trained in {result.seconds:.0f} s on {result.device}"
    )
    return ModelOutcome(record=record, reused=False)


@dataclass
class ProbabilityResult:
    path: Path
    detector: str  # a model id, or "index-baseline"
    device: str
    mean_probability: float
    mining_fraction: float  # share of valid pixels >= threshold
    threshold: float
    mining_ha: float
    valid_fraction: float
    seconds: float
    metrics: dict[str, Any] | None  # against truth, where the region has it
    truth_ha: float | None = None  # true mining area on the same grid, where known


def map_probability(
    root: Path,
    region: Region,
    period_id: str,
    *,
    record: registry.ModelRecord | None,
    device: str = "auto",
    tile: int = 0,
    overlap: int = 32,
    batch: int = 0,
    dtype: str = "float16",
    compile: bool | str = False,
    progress: Callable[[str], None] = print,
) -> ProbabilityResult:
    """Mining probability COG for one composite, from ``record`` or the index baseline."""
    src = composite_path(root, region.id, period_id)
    if not src.exists():
        raise DetectionError(
            f"no composite at {src}: materialise `composite` for {region.id}/{period_id} first"
        )
    started = time.perf_counter()
    dev = pick_device(device)
    on_gpu = dev.type == "cuda" and record is not None
    # On a GPU the scene is uploaded while the model runs: pinned, half precision.
    try:
        comp = read_composite(src, pinned=on_gpu, dtype=np.float16 if on_gpu else np.float32)
    except (rasterio.errors.RasterioError, CPLE_BaseError) as e:
        raise DetectionError(
            f"the composite {src} cannot be read ({first_line(e)}): it is damaged or cut short. "
            f"Re-materialise `composite` for {region.id}/{period_id}; `asmwatch doctor` "
            "lists every damaged file"
        ) from e
    if record is None:
        progress("mining_probability: no trained model registered; using the index baseline")
        prob = index_baseline(comp.features)
        prob[~comp.valid] = np.nan
        detector, used, threshold = "index-baseline", "cpu", THRESHOLD
    else:
        model, norm, _ = registry.load(root, record)
        tile = tile or INFER_DEFAULTS[dev.type][0]
        batch = batch or INFER_DEFAULTS[dev.type][1]
        height, width = comp.valid.shape
        plan = plan_tiles(height, width, tile, overlap)
        progress(
            f"mining_probability: {record.model_id} on {dev}: {plan.n_tiles} tiles of "
            f"{plan.tile_h} x {plan.tile_w} px, overlap >= {overlap}, batch {batch}"
            + (f", {dtype}{' compiled' if compile else ''}" if dev.type == "cuda" else "")
        )
        if dev.type == "cuda" and compile:
            # Compiled kernels and autotuning results survive the process: the first run
            # on a machine pays for them, later ones load them.
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(root / "cache" / "inductor"))
        t_infer = time.perf_counter()

        reports: dict[int, Progress] = {}

        def rows_done(i: int, n: int) -> None:
            if n not in reports:  # CPU: batches of tiles; CUDA: rows of tiles
                reports[n] = Progress("mining_probability", n, progress, unit="tile batches done", steps=5)  # fmt: skip
            reports[n](i)

        prob = predict_tiled(
            model, comp.features, normalizer=norm, tile=tile, overlap=overlap, batch=batch,
            device=dev, dtype=dtype, compile=compile, progress=rows_done,
        )  # fmt: skip
        progress(
            f"mining_probability: {comp.valid.size / 1e6:.1f} Mpx in "
            f"{time.perf_counter() - t_infer:.2f} s"
        )
        detector, used = record.model_id, str(dev)
        threshold = float(record.metrics.get("threshold", THRESHOLD))
    target = probability_path(root, region.id, period_id)
    _write_probability(target, prob, comp.transform, comp.crs, detector, threshold)
    valid = np.isfinite(prob)
    mining = valid & (prob >= threshold)
    px_ha = abs(comp.transform.a * comp.transform.e) / 10_000
    metrics, truth_ha = None, None
    truth = world_dir(root, region) / "truth" / f"{period_id}.tif"
    if region.source == "embedded" and truth.exists():
        labels = read_labels(truth, comp)
        metrics = evaluate(prob, labels, threshold)
        truth_ha = round(float((labels == 1).sum()) * px_ha, 2)
    return ProbabilityResult(
        path=target,
        detector=detector,
        device=used,
        mean_probability=float(np.nanmean(prob)) if valid.any() else 0.0,
        mining_fraction=float(mining.sum() / valid.sum()) if valid.any() else 0.0,
        mining_ha=round(float(mining.sum()) * px_ha, 2),
        valid_fraction=float(valid.mean()),
        seconds=time.perf_counter() - started,
        metrics=metrics,
        truth_ha=truth_ha,
        threshold=threshold,
    )


def _write_probability(
    target: Path,
    prob: npt.NDArray[np.float32],
    transform: Any,
    crs: Any,
    detector: str,
    threshold: float,
) -> None:
    profile = {
        "driver": "COG", "width": prob.shape[1], "height": prob.shape[0], "count": 1,
        "dtype": "float32", "crs": crs, "transform": transform, "nodata": float("nan"),
        "compress": "DEFLATE", "predictor": "3", "blocksize": 512,
        "overview_resampling": "average",
    }  # fmt: skip
    with atomic_path(target) as tmp, rasterio.open(tmp, "w", **profile) as dst:
        dst.write(prob, 1)
        dst.set_band_description(1, "mining_probability")
        dst.update_tags(asmwatch_detector=detector, asmwatch_threshold=str(threshold))
