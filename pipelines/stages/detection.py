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

import dataclasses
import datetime as dt
import functools
import itertools
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import rasterio
import rasterio.errors
from rasterio._err import CPLE_BaseError  # GDAL's errors, raised as they come

from ml import registry
from ml.features import (
    FEATURE_BANDS,
    IGNORE,
    VECTOR_SUFFIXES,
    LabelsError,
    LabelSource,
    Normalizer,
    feature_indexes,
    label_shapes,
    labels_frame,
    read_features,
)
from ml.infer import owned_plan, pick_device, plan_tiles, predict_tiled, sub_plan
from ml.metrics import best_threshold, confusion, expected_threshold, scores
from ml.models import index_baseline
from ml.points import POINT_RADIUS_PX, POINT_SIMILARITY, gate_windows, is_point_file
from ml.train import Labelled, TrainConfig, train_unet
from pipelines.embedded.source import context_path, world_dir
from pipelines.infra.errors import first_line
from pipelines.infra.layout import composite_path, probability_path
from pipelines.infra.progress import Progress
from pipelines.infra.tiling import (
    DEFAULT_TILE,
    Span,
    Tile,
    TileReadError,
    Tiling,
    check_tile_size,
    gpu_workers,
    resolve_client,
    run_tiles,
    staged_cog,
)
from pipelines.regions import Region

if TYPE_CHECKING:
    from distributed import Client

VAL_FRACTION = 0.25  # eastern share of each training scene kept for early stopping
VAL_WINDOW = 512  # validation strips are predicted in windows of up to this edge, px
MAX_VAL_WINDOWS = 32  # per composite: early stopping's cost and memory do not grow with the AOI
NORM_WINDOWS, NORM_WINDOW = 64, 64  # the normaliser's pixel sample: windows per composite, edge
THRESHOLD = 0.5  # for the index baseline, and for models registered without one
# (tile edge, tiles per forward pass) when not configured: small tiles keep CPU memory
# low; on a GPU, large tiles waste less on overlap (docs/performance.md).
INFER_DEFAULTS = {"cpu": (256, 16), "cuda": (2048, 6)}
# Processing tile on CUDA: several 2048 px inference windows per task, so that the GPU
# gets full batches and the per-task overhead stays small against 1,000 Mpx/s.
GPU_TILE = 8192


class DetectionError(ValueError):
    """Missing or unusable inputs; the message names them and what to run first."""


@dataclass(frozen=True)
class TrainingScene:
    region: str
    period: str
    composite: Path
    labels: Path  # what training and early stopping learn from
    heldout: bool
    truth: Path | None = None  # what the held-out figures are scored against (else labels)
    dates: tuple[dt.date, dt.date] | None = None  # the period's, to choose timed points

    @property
    def scored_against(self) -> Path:
        return self.truth or self.labels


@dataclass
class ModelOutcome:
    record: registry.ModelRecord
    reused: bool
    messages: list[str] = field(default_factory=list)


def training_scenes(root: Path, regions: Sequence[Region]) -> list[TrainingScene]:
    """Composites with labels, every period of each region that has them, the last held
    out. Labels: a region's ``mining_labels`` layer (polygons or points), else an
    embedded world's truth masks. An embedded region's held-out period is always scored
    against its truth mask, whatever it trained from. Label files are checked here, in
    full, before anything is trained."""
    out = []
    for region in regions:
        layer = context_path(root, region, "mining_labels")
        if (region.source != "embedded" and layer is None) or len(region.periods) < 2:
            continue
        if layer is not None and layer.exists():
            check_labels(layer, region)
        for i, period in enumerate(region.periods):
            truth = world_dir(root, region) / "truth" / f"{period.id}.tif"
            out.append(
                TrainingScene(
                    region=region.id,
                    period=period.id,
                    composite=composite_path(root, region.id, period.id),
                    labels=layer if layer is not None else truth,
                    heldout=i == len(region.periods) - 1,
                    truth=truth if region.source == "embedded" else None,
                    dates=(period.start, period.end),
                )
            )
    if not out:
        raise DetectionError(
            "no labelled training data: the model trains on regions with ground truth "
            "(source: embedded, or a `mining_labels` polygon layer in context) and at "
            "least two periods"
        )
    missing = [
        s
        for s in out
        if not s.composite.exists() or not s.labels.exists() or not s.scored_against.exists()
    ]
    if missing:
        names = ", ".join(f"{s.region}/{s.period}" for s in missing)
        raise DetectionError(
            f"training inputs missing for {names}: materialise `composite` for those "
            "partitions first (labels come with the embedded world)"
        )
    return out


def check_labels(path: Path, region: Region) -> None:
    """A region's ``mining_labels`` file read and checked in full (``LabelsError`` naming
    the file and features): polygons as ``label_shapes`` reads them; points by
    ``ml.points``' rules, every point inside the AOI, and each class present in the
    training periods (all but the last)."""
    from ml.points import outside_aoi, read_points

    frame = labels_frame(path)
    if not is_point_file(frame, path):
        label_shapes(path, "EPSG:4326", frame=frame)
        return
    points = read_points(frame, path, "EPSG:4326")
    outside_aoi(points, region.geometry, region.id)
    train = region.periods[:-1]
    held = [points.during(p.start, p.end).label for p in train]
    counts = np.bincount(np.concatenate(held), minlength=2) if held else np.zeros(2, np.int64)
    if counts.min() == 0:
        raise LabelsError(
            f"mining labels file {path}: in the training periods "
            f"({', '.join(p.id for p in train)}) it has {counts[1]} mining and {counts[0]} "
            "not-mining points; both are needed (check the points' period or "
            "composite_start/composite_end against the region's periods)"
        )


def training_domain(regions: Sequence[Region], scenes: Sequence[TrainingScene]) -> dict[str, Any]:
    """What a model trained on ``scenes`` has seen (``ModelRecord.domain``): the
    regions, their sources and countries, the periods, the input bands, and whether the
    imagery was the simulator's (``embedded``), real Sentinel-2 (``real``) or both."""
    used = {s.region for s in scenes}
    chosen = [r for r in regions if r.id in used]
    kinds = {"embedded" if r.source == "embedded" else "real" for r in chosen}
    return {
        "imagery": kinds.pop() if len(kinds) == 1 else "mixed",
        "regions": sorted(used),
        "sources": sorted({r.source for r in chosen}),
        "countries": sorted({c for r in chosen for c in r.country}),
        "biomes": sorted({r.biome for r in chosen if r.biome}),
        "periods": sorted(f"{s.region}/{s.period}" for s in scenes),
        "bands": list(FEATURE_BANDS),
        "labels": sorted({label_kind(s.labels) for s in scenes}),
    }


def _untimed_points(path: Path) -> bool:
    if label_kind(path) != "points":
        return False
    with LabelSource(path, "EPSG:4326") as source:
        return source.points is not None and source.points.start is None


def label_kind(path: Path) -> str:
    """``raster`` (a truth mask), ``points`` or ``polygons`` (a labels file)."""
    if path.suffix.lower() not in VECTOR_SUFFIXES:
        return "raster"
    return "points" if is_point_file(labels_frame(path), path) else "polygons"


@dataclass(frozen=True)
class ModelChoice:
    """The model a region's probability maps use (None: the spectral index baseline),
    and why, in words for the log, the asset's metadata and the COG's tags."""

    record: registry.ModelRecord | None
    reason: str


def domain_text(record: registry.ModelRecord) -> str:
    d = record.domain
    what = {"embedded": "simulated (embedded) scenes", "real": "real Sentinel-2 composites", "mixed": "simulated and real composites"}.get(record.imagery, "unrecorded imagery (registered before domains were recorded)")  # fmt: skip
    if record.kind == "chips" and d.get("product"):
        what = f"real Sentinel-2 {d['product']}"
    return f"{what} of {', '.join(d.get('regions') or ['?'])}"


def choose_model(root: Path, region: Region) -> ModelChoice:
    """The model for ``region`` by its ``model`` setting.

    ``none``: the spectral index baseline. A model id: that model (an error naming the
    registered ones when it is not there); a model that has seen only simulated scenes,
    chosen for a real region, is used as asked and said so. ``auto``: the newest model
    trained on this region; else, for a real region, the newest trained on real imagery
    of one of its countries, then of its ``biome`` (in another country); else, for an
    embedded region, the newest trained on embedded scenes (the simulator is its
    domain). ``auto`` never applies a model
    trained only on simulated (or unrecorded) imagery to a real region: that fails,
    saying how to train one or how to choose. No model registered at all for an
    embedded region: the baseline, said so. A screening detector (kind ``chips``,
    ``ml.chips``) is used only when a region names it: ``auto`` chooses among
    segmentation models.
    """
    setting = region.model
    if setting == "none":
        return ModelChoice(None, "the region's `model: none`: the spectral index baseline")
    every = registry.records(root)
    unets = [r for r in every if r.kind == "unet"]
    newest = registry.newest
    if setting != "auto":
        hit = [r for r in every if r.model_id == setting]
        if not hit:
            known = ", ".join(r.model_id for r in every[-5:]) or "none registered"
            raise DetectionError(
                f"region {region.id!r} asks for `model: {setting}`, which is not registered "
                f"under {registry.models_dir(root)} (newest: {known}); use `auto`, `none` or "
                'a registered id (`asmwatch sql "SELECT model_id FROM models"`)'
            )
        record = hit[0]
        note = ""
        if record.kind == "chips":
            countries = set(record.domain.get("countries", []))
            outside = "" if set(region.country) & countries else f", outside its countries ({', '.join(sorted(countries))}): its figures may not hold here"  # fmt: skip
            if region.source == "embedded":
                outside += "; note: this region is simulated and the chips are real imagery: its figures do not hold here"  # fmt: skip
            return ModelChoice(record, f"the region's `model: {setting}`: a SCREENING chip classifier trained on {domain_text(record)}{outside}")  # fmt: skip
        if region.source != "embedded" and record.imagery != "real":
            note = f"; note: it was trained on {domain_text(record)}, not on real imagery"
        return ModelChoice(record, f"the region's `model: {setting}`{note}")
    own = [r for r in unets if region.id in r.domain.get("regions", [])]
    if own:
        return ModelChoice(newest(own), f"trained on this region ({domain_text(newest(own))})")
    if region.source != "embedded":
        countries = set(region.country)
        real = [r for r in unets if r.imagery in ("real", "mixed") and countries & set(r.domain.get("countries", []))]  # fmt: skip
        if real:
            pick = newest(real)
            shared = ", ".join(sorted(countries & set(pick.domain.get("countries", []))))
            return ModelChoice(pick, f"trained on real imagery of the same country ({shared}): {domain_text(pick)}")  # fmt: skip
        same_biome = [r for r in unets if r.imagery in ("real", "mixed") and region.biome and region.biome in r.domain.get("biomes", [])]  # fmt: skip
        if same_biome:
            pick = newest(same_biome)
            return ModelChoice(pick, f"trained on real imagery of the same biome ({region.biome}) in another country: {domain_text(pick)}")  # fmt: skip
        seen = (
            "; ".join(f"{r.model_id}: {domain_text(r)}" for r in unets[-3:]) or "none is registered"
        )
        screening = [r for r in every if r.kind == "chips"]
        if screening:
            seen += (
                f"; for screening (48 px chips, not a segmentation) `model: {newest(screening).model_id}`, "
                f"trained on {domain_text(newest(screening))}"
            )  # fmt: skip
        raise DetectionError(
            f"region {region.id!r} is real imagery ({region.source}) and no registered model "
            f"was trained on it or on real imagery of its country "
            f"({', '.join(region.country) or 'no `country` set'}) or biome "
            f"({region.biome or 'no `biome` set'}); asmwatch will not apply a "
            f"model trained on simulated scenes to it (models: {seen}). Train one: add "
            "a `mining_labels` layer (polygons of mined land, or labelled points) to the "
            "region's context and materialise `mining_model`; or choose explicitly in the "
            "regions file: "
            "`model: none` (the spectral index baseline) or `model: <model id>`"
        )
    sim = [r for r in unets if r.imagery == "embedded"]
    if sim:
        return ModelChoice(newest(sim), f"trained on simulated scenes like this region's ({domain_text(newest(sim))})")  # fmt: skip
    return ModelChoice(None, "no model is registered: the spectral index baseline (materialise `mining_model` for the U-Net)")  # fmt: skip


def _describe(root: Path, s: TrainingScene) -> dict[str, str]:
    def rel(p: Path) -> str:  # relative to the data root where it lies inside it
        return p.relative_to(root).as_posix() if p.is_relative_to(root) else str(p)

    out = {
        "region": s.region,
        "period": s.period,
        "role": "heldout" if s.heldout else "train",
        "composite": rel(s.composite),
        "labels": rel(s.labels),
    }
    if s.truth is not None and s.truth != s.labels:
        out["scored_against"] = rel(s.truth)
    return out


class CompositeChips:
    """A training composite read chip by chip (``ml.train.ChipSource``): normalised
    features, labels on the chip's grid, the eastern validation strip ignored."""

    def __init__(self, scene: TrainingScene, norm: Normalizer) -> None:
        self.name = f"{scene.region}/{scene.period}"
        self.path = scene.composite
        self.src = rasterio.open(scene.composite)
        self.norm = norm
        self.cut = int(self.src.width * (1 - VAL_FRACTION))
        self.labels_src = LabelSource(scene.labels, self.src.crs, scene.period, dates=scene.dates)
        self.anchors: npt.NDArray[np.int64] | None = None
        self.anchor_labels: npt.NDArray[np.uint8] | None = None
        if self.labels_src.points is not None:  # sparse: chips are cut around the points
            points = self.labels_src.points
            rows, cols = points.pixels(self.src.transform)
            keep = (rows >= 0) & (rows < self.src.height) & (cols >= 0) & (cols < self.cut)
            self.anchors = np.stack([rows[keep], cols[keep]], axis=1)
            self.anchor_labels = points.label[keep]
        self._last: tuple[tuple[int, int, int], npt.NDArray[np.float32]] | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.src.height), int(self.src.width)

    def _raw(self, r0: int, c0: int, size: int) -> npt.NDArray[np.float32]:
        key = (r0, c0, size)
        if self._last is None or self._last[0] != key:
            span = Span(r0, r0 + size, c0, c0 + size)
            self._last = (key, read_features(self.src, self.path, span))
        return self._last[1]

    def labels(self, r0: int, c0: int, size: int) -> npt.NDArray[np.uint8]:
        raw = self._raw(r0, c0, size)
        span = Span(r0, r0 + size, c0, c0 + size)
        valid = np.asarray(np.isfinite(raw).all(axis=0))
        y = self.labels_src.read(self.src.window_transform(span.window), valid)
        if self.anchors is not None and self.anchor_labels is not None:
            y = gate_windows(
                y, self.norm.apply(raw), self.anchors[:, 0] - r0, self.anchors[:, 1] - c0,
                self.anchor_labels, IGNORE,
            )  # fmt: skip
        y[:, max(0, self.cut - c0) :] = IGNORE  # the validation strip
        return y

    def features(self, r0: int, c0: int, size: int) -> npt.NDArray[np.float32]:
        return self.norm.apply(self._raw(r0, c0, size))

    def close(self) -> None:
        self.src.close()
        self.labels_src.close()


#: Self-training from point labels: the points model labels the pixels it is this sure of
#: (corrected probability at least this, or at most 1 minus it) for a second model.
SELF_TRAIN_CONFIDENCE = 0.9
SELF_TRAIN_ROUNDS = 1


class PseudoLabelled:
    """A training composite whose unlabelled pixels take a teacher model's confident
    answers (``ml.train.ChipSource``): the points where there are points, else 1 where
    the teacher's probability is at least ``confidence``, 0 where it is at most
    1 - ``confidence``, unknown between. Chips are labelled as they are read (no label
    raster is made), anywhere outside the validation strip."""

    anchors: npt.NDArray[np.int64] | None = None

    def __init__(self, base: CompositeChips, teacher: Any, dev: Any, confidence: float) -> None:
        self.base, self.teacher, self.dev, self.confidence = base, teacher, dev, confidence
        self.name = f"{base.name} (self-trained)"

    @property
    def shape(self) -> tuple[int, int]:
        return self.base.shape

    def labels(self, r0: int, c0: int, size: int) -> npt.NDArray[np.uint8]:
        y = self.base.labels(r0, c0, size)  # points; the validation strip is unknown
        raw = self.base._raw(r0, c0, size)
        p = predict_tiled(self.teacher, self.base.features(r0, c0, size), tile=128, overlap=16, device=self.dev)  # fmt: skip
        pseudo = np.full(y.shape, IGNORE, np.uint8)
        pseudo[p >= self.confidence] = 1
        pseudo[p <= 1 - self.confidence] = 0
        pseudo[~np.isfinite(raw).all(axis=0)] = IGNORE
        pseudo[:, max(0, self.base.cut - c0) :] = IGNORE
        return np.where(y != IGNORE, y, pseudo).astype(np.uint8)

    def features(self, r0: int, c0: int, size: int) -> npt.NDArray[np.float32]:
        return self.base.features(r0, c0, size)

    def close(self) -> None:
        self.base.close()


def fit_normalizer(scenes: Sequence[TrainingScene], seed: int) -> Normalizer:
    """Per-band mean and std from ``NORM_WINDOWS`` random windows of each composite."""
    rng = np.random.default_rng(seed)
    samples = []
    for s in scenes:
        with rasterio.open(s.composite) as src:
            size = min(NORM_WINDOW, src.height, src.width)
            for _ in range(NORM_WINDOWS):
                r0 = int(rng.integers(0, src.height - size + 1))
                c0 = int(rng.integers(0, src.width - size + 1))
                feats = read_features(src, s.composite, Span(r0, r0 + size, c0, c0 + size))
                samples.append(feats[:, np.isfinite(feats).all(axis=0)])
    return Normalizer.fit(samples)


def validation_windows(scene: TrainingScene, norm: Normalizer) -> list[Labelled]:
    """The eastern strip of a training composite in windows of up to ``VAL_WINDOW`` px,
    at most ``MAX_VAL_WINDOWS`` of them spread over the strip (memory: bounded)."""
    with rasterio.open(scene.composite) as src:
        cut = int(src.width * (1 - VAL_FRACTION))
        rows, cols = _even_split(src.height), _even_split(src.width - cut)
        spans = [Span(r0, r1, c0 + cut, c1 + cut) for r0, r1 in rows for c0, c1 in cols]
        if len(spans) > MAX_VAL_WINDOWS:
            pick = np.linspace(0, len(spans) - 1, MAX_VAL_WINDOWS).round().astype(int)
            spans = [spans[i] for i in sorted(set(pick.tolist()))]
        out = []
        with LabelSource(scene.labels, src.crs, scene.period, dates=scene.dates) as labels:
            for span in spans:
                raw = read_features(src, scene.composite, span)
                y = labels.read(src.window_transform(span.window), np.isfinite(raw).all(axis=0))
                name = f"{scene.region}/{scene.period}:val:{span.row0},{span.col0}"
                valid = np.isfinite(raw).all(axis=0)
                out.append(Labelled(name, norm.apply(raw), y, valid=valid))
    return out


def _even_split(size: int, edge: int = VAL_WINDOW) -> list[tuple[int, int]]:
    """[start, end) pieces of near-equal length, at most ``edge``, covering ``size``."""
    n = max(1, -(-size // edge))
    cuts = [round(i * size / n) for i in range(n + 1)]
    return list(itertools.pairwise(cuts))


def _valid_pixels(
    val: Sequence[Labelled], probs: list[tuple[npt.NDArray[np.float32], npt.NDArray[np.uint8]]]
) -> npt.NDArray[np.float32]:
    """The probabilities of every valid pixel of the validation windows, labelled or not."""
    return np.concatenate(
        [p[v.valid] for (p, _y), v in zip(probs, val, strict=True) if v.valid is not None]
    )


def correct_prior(
    model: Any,
    val: Sequence[Labelled],
    val_probs: list[tuple[npt.NDArray[np.float32], npt.NDArray[np.uint8]]],
    points: Sequence[npt.NDArray[np.uint8]],
    dev: Any,
) -> tuple[dict[str, Any], list[tuple[npt.NDArray[np.float32], npt.NDArray[np.uint8]]]]:
    """A model trained on point samples learns their share of mining (often half), not
    the land's (a few per cent), and would overstate mined area. The land's share is
    estimated on every valid pixel of the validation strips (``estimate_prior``), and
    the model's logits are shifted by the difference of log-odds (in the checkpoint).
    Returns the record's ``prior`` entry and the validation probabilities after the
    shift."""
    from ml.metrics import estimate_prior
    from ml.models import shift_logits

    labels = np.concatenate(list(points))
    trained = float(np.clip(labels.mean(), 0.01, 0.99))
    estimated = float(np.clip(estimate_prior(_valid_pixels(val, val_probs), trained), 1e-4, 1 - 1e-4))  # fmt: skip
    offset = float(np.log(estimated / (1 - estimated)) - np.log(trained / (1 - trained)))
    shift_logits(model, offset)
    shifted = [(predict_tiled(model, v.x, tile=128, overlap=16, device=dev), v.y) for v in val]
    entry = {
        "training": round(trained, 4),
        "estimated": round(estimated, 4),
        "logit_offset": round(offset, 4),
        "method": "EM on the validation strips' pixels (Saerens et al. 2002)",
    }
    return entry, shifted


def heldout_confusion(
    scene: TrainingScene, model: Any, norm: Normalizer, threshold: float, dev: Any
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """(U-Net, index baseline) confusion counts on a held-out composite, tile by tile,
    with the inference plan of the whole composite (as ``mining_probability``)."""
    unet, base = np.zeros(4, np.int64), np.zeros(4, np.int64)
    with rasterio.open(scene.composite) as src, LabelSource(scene.scored_against, src.crs, scene.period, dates=scene.dates) as labels:  # fmt: skip
        whole = plan_tiles(src.height, src.width, 256, 32)
        for t in Tiling(src.height, src.width, DEFAULT_TILE).tiles():
            c = t.core
            part, (r0, r1, c0, c1) = sub_plan(whole, c.row0, c.row1, c.col0, c.col1)
            feats = read_features(src, scene.composite, Span(r0, r1, c0, c1))
            prob = predict_tiled(model, feats, normalizer=norm, plan=part, device=dev)
            rows, cols = c.within(Span(r0, r1, c0, c1))
            prob, core = prob[rows, cols], feats[:, rows, cols]
            y = labels.read(src.window_transform(c.window), np.isfinite(core).all(axis=0))
            unet += np.asarray(confusion(prob, y, threshold))
            base += np.asarray(confusion(index_baseline(core), y, THRESHOLD))
    return unet, base


def self_train(
    teacher: Any,
    scenes: Sequence[TrainingScene],
    norm: Normalizer,
    val: Sequence[Labelled],
    cfg: TrainConfig,
    dev: Any,
    round_: int,
    progress: Callable[[str], None],
) -> tuple[Any, list[tuple[npt.NDArray[np.float32], npt.NDArray[np.uint8]]], float, float, dict[str, Any]]:  # fmt: skip
    """One round of self-training (docs/detection.md): a new model of the same schedule
    learns from the points and the teacher's confident pixels (``PseudoLabelled``) for
    every epoch (the last weights kept, as the teacher's), and takes its threshold from
    the IoU its probabilities expect over the validation strips' pixels. The teacher's probabilities
    are already corrected to the land's share of mining, so the pseudo-labels are too."""
    sources = [PseudoLabelled(CompositeChips(s, norm), teacher.model, dev, SELF_TRAIN_CONFIDENCE) for s in scenes]  # fmt: skip
    progress(
        f"mining_model: self-training round {round_}: a new U-Net learns from the points and "
        f"the previous model's pixels of probability >= {SELF_TRAIN_CONFIDENCE} or <= "
        f"{1 - SELF_TRAIN_CONFIDENCE:.2f}, labelled chip by chip"
    )
    try:
        student = train_unet(sources, val, dataclasses.replace(cfg, seed=cfg.seed + round_), device=dev, progress=progress, keep_last=True)  # fmt: skip
    finally:
        for src in sources:
            src.close()
    val_probs = [(predict_tiled(student.model, v.x, tile=128, overlap=16, device=dev), v.y) for v in val]  # fmt: skip
    threshold, val_iou = expected_threshold(_valid_pixels(val, val_probs))
    student.seconds += teacher.seconds
    progress(f"mining_model: self-training round {round_}: threshold {threshold} (IoU expected from the strips' probabilities {val_iou:.3f})")  # fmt: skip
    entry = {
        "round": round_,
        "confidence": SELF_TRAIN_CONFIDENCE,
        "teacher_validation": teacher.best_val,
        "validation": student.best_val,
        "threshold": threshold,
    }
    return student, val_probs, threshold, val_iou, entry


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
    files = list(
        dict.fromkeys(p for s in scenes for p in (s.composite, s.labels, s.scored_against))
    )
    extra: dict[str, Any] = {"val_fraction": VAL_FRACTION}
    if any(label_kind(s.labels) == "points" for s in scenes if not s.heldout):
        extra["self_training"] = [SELF_TRAIN_ROUNDS, SELF_TRAIN_CONFIDENCE]
        extra["point_similarity"] = POINT_SIMILARITY
        extra["point_radius_px"] = POINT_RADIUS_PX
    key = registry.input_hash(files, {**cfg.to_dict(), **extra})
    if not force and (hit := registry.find(root, key)) is not None:
        progress(f"mining_model: inputs unchanged (hash {key}); reusing {hit.model_id}")
        return ModelOutcome(record=hit, reused=True)

    train_scenes = [s for s in scenes if not s.heldout]
    test_scenes = [s for s in scenes if s.heldout]
    # No composite is read whole: the normaliser sees a sample of windows, training
    # reads chips, validation a bounded set of windows, the test tile by tile.
    norm = fit_normalizer(train_scenes, cfg.seed)
    train = [CompositeChips(s, norm) for s in train_scenes]
    val = [w for s in train_scenes for w in validation_windows(s, norm)]
    dev = pick_device(device)
    progress(
        f"mining_model: training a U-Net ({cfg.spec.encoder}) on {len(train)} composite(s) "
        f"[{', '.join(t.name for t in train)}] on {dev}, chips read window by window; "
        f"{len(val)} validation window(s); held out: "
        f"{', '.join(f'{s.region}/{s.period}' for s in test_scenes)}"
    )
    label_kinds = sorted({label_kind(s.labels) for s in train_scenes})
    points = [t.anchor_labels for t in train if t.anchor_labels is not None]
    if points:
        progress(
            f"mining_model: sparse labels: {sum(map(len, points))} labelled point(s) in the "
            f"training strips, each a {2 * POINT_RADIUS_PX + 1} px square (its pixels "
            f"within {POINT_SIMILARITY} of the point's own in normalised features); chips "
            "are cut around them"
        )
    try:
        # Points: every epoch, the last weights kept. The IoU over a hundred validation
        # points saturates within a few epochs, and early stopping on it kept
        # under-trained, badly calibrated models (held-out IoU 0.59 for one sample).
        result = train_unet(train, val, cfg, device=dev, progress=progress, keep_last=bool(points))
    finally:
        for t in train:
            t.close()
    # The decision threshold is chosen on the validation windows, never on held-out data.
    val_probs = [
        (predict_tiled(result.model, v.x, tile=128, overlap=16, device=dev), v.y) for v in val
    ]
    prior = None
    self_training: list[dict[str, Any]] = []
    if points:  # samples, not land: correct the model and the threshold to the land's share
        prior, val_probs = correct_prior(result.model, val, val_probs, points, dev)
        threshold, val_iou = expected_threshold(_valid_pixels(val, val_probs))
        progress(
            f"mining_model: points give a mining share of {prior['training']:.3f}; the "
            f"validation strips' pixels, {prior['estimated']:.3f} (EM): logits shifted by "
            f"{prior['logit_offset']:+.2f}; threshold {threshold} (IoU expected from the "
            f"strips' corrected probabilities {val_iou:.3f})"
        )
        for round_ in range(1, SELF_TRAIN_ROUNDS + 1):
            result, val_probs, threshold, val_iou, entry = self_train(
                result, train_scenes, norm, val, cfg, dev, round_, progress
            )
            self_training.append(entry)
    else:
        threshold, val_iou = best_threshold(val_probs)
        progress(f"mining_model: threshold {threshold} (validation IoU {val_iou:.3f})")

    unet_cm = np.zeros(4, np.int64)
    base_cm = np.zeros(4, np.int64)
    per_scene = {}
    for s in test_scenes:
        u, b = heldout_confusion(s, result.model, norm, threshold, dev)
        unet_cm += u
        base_cm += b
        per_scene[f"{s.region}/{s.period}"] = {
            "unet": scores(*(int(v) for v in u)),
            "baseline": scores(*(int(v) for v in b)),
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
        "labels": label_kinds,
        "training_points": sum(map(len, points)) if points else None,
        "prior": prior,
        "self_training": self_training or None,
        "heldout_scored_against": {
            f"{s.region}/{s.period}": label_kind(s.scored_against) for s in test_scenes
        },
    }
    untimed = [s for s in test_scenes if s.truth is None and _untimed_points(s.labels)]
    if untimed:
        metrics["heldout_note"] = (
            "held-out figures are at the same points as training (the points carry no "
            "period), one period later: not an independent test of new places"
        )
        progress(f"mining_model: warning: {metrics['heldout_note']}")
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
        config={**cfg.to_dict(), **extra},
        domain=training_domain(regions, scenes),
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
    tiles: int = 1
    tile_px: int = DEFAULT_TILE
    screening: bool = False  # a chip classifier's blocks, not a segmentation


@dataclass(frozen=True)
class ProbabilityJob:
    """What every tile task of one probability raster needs (pickled to dask workers)."""

    composite: str
    root: str
    record: registry.ModelRecord | None
    height: int
    width: int
    threshold: float
    device: str = "auto"
    infer_tile: int = 0  # 0: INFER_DEFAULTS for the device
    overlap: int = 32
    batch: int = 0
    dtype: str = "float16"
    compile: bool | str = False
    truth: str | None = None  # truth raster (embedded worlds): per-tile confusion


@dataclass
class TileProbability:
    """One tile's share of the probability: the sums of the inference windows that
    start in its core, over the pixels they reach (``span``: the core, and up to one
    window past its bottom and right edges). The partition adds the shares."""

    span: Span
    part: npt.NDArray[np.float32]
    device: str


def _windows(job: ProbabilityJob, dev_type: str, core: Span) -> Any:
    """The inference windows (``owned_plan``) that start in ``core``; None for the
    index baseline or when none starts there."""
    if job.record is None or job.record.kind == "chips":
        return None
    infer = job.infer_tile or INFER_DEFAULTS[dev_type][0]
    whole = _whole_plan(job.height, job.width, infer, job.overlap)
    return owned_plan(whole, core.row0, core.row1, core.col0, core.col1)


@functools.lru_cache(maxsize=4)
def _whole_plan(height: int, width: int, tile: int, overlap: int) -> Any:
    """The raster's inference plan, made once per process for all its tiles."""
    return plan_tiles(height, width, tile, overlap)


def tile_extent(core: Span, owned: Any) -> Span:
    """The pixels ``probability_tile`` returns: the core, and where its windows reach."""
    if owned is None:
        return core
    _, (_r0, r1, _c0, c1) = owned
    return Span(core.row0, max(core.row1, r1), core.col0, max(core.col1, c1))


_MODELS: dict[tuple[str, int, int], tuple[Any, Any]] = {}


def _model(job: ProbabilityJob) -> tuple[Any, Any]:
    """The job's model and normaliser, loaded once per process (a dask worker keeps it
    across tiles); a checkpoint that changed or went missing is loaded (or refused) anew."""
    record = job.record
    assert record is not None
    path = registry.checkpoint_file(Path(job.root), record)
    try:
        st = path.stat()
        key = (str(path), st.st_mtime_ns, st.st_size)
    except OSError:
        key = None
    if key is None or key not in _MODELS:
        # names what is wrong
        if record.kind == "chips":
            model, norm = registry.load_chip_model(Path(job.root), record), None
        else:
            model, norm, _ = registry.load(Path(job.root), record)
        _MODELS.clear()  # one model at a time per process
        if key is not None:
            _MODELS[key] = (model, norm)
        return model, norm
    return _MODELS[key]


def probability_tile(tile: Tile, job: ProbabilityJob) -> TileProbability:
    """One tile's share of the mining probability (a dask task): the U-Net on the
    inference windows of the whole-raster plan that start in the tile's core (each
    window belongs to exactly one tile, so none is computed twice), from windowed reads
    of the composite; or the index baseline over the core."""
    import torch

    from pipelines.infra.tiling import in_dask_worker, worker_threads

    dev = pick_device(job.device)
    if in_dask_worker() and dev.type == "cpu":
        torch.set_num_threads(worker_threads())  # the worker's share of the cores
    core = tile.core
    owned = _windows(job, dev.type, core)
    span = tile_extent(core, owned)
    part = np.zeros(span.shape, np.float32)
    with rasterio.open(job.composite) as src:
        if job.record is None:
            feats = read_features(src, job.composite, core)
            part = index_baseline(feats).astype(np.float32)
            part[~np.isfinite(feats).all(axis=0)] = np.nan
            return TileProbability(span, part, "cpu")
        if job.record.kind == "chips":
            return TileProbability(span, screen_tile(src, job, core, dev), str(dev))
        if owned is None:  # no window starts here: the neighbours' windows cover it
            return TileProbability(span, part, str(dev))
        plan, (r0, r1, c0, c1) = owned
        on_gpu = dev.type == "cuda"
        read = Span(r0, r1, c0, c1)
        feats = read_features(
            src, job.composite, read, pinned=on_gpu, dtype=np.float16 if on_gpu else np.float32
        )
    model, norm = _model(job)
    if on_gpu and job.compile:
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(job.root) / "cache" / "inductor"))  # fmt: skip
    out = predict_tiled(
        model, feats, normalizer=norm, plan=plan, batch=job.batch or INFER_DEFAULTS[dev.type][1],
        device=dev, dtype=job.dtype, compile=job.compile,
    )  # fmt: skip
    rows, cols = read.within(span)
    part[rows, cols] = out
    return TileProbability(span, part, str(dev))


def screen_tile(src: Any, job: ProbabilityJob, core: Span, dev: Any) -> npt.NDArray[np.float32]:
    """The screening detector (a chip classifier, ``ml.chips``) over one tile's core.

    The raster is cut into blocks of the record's ``stride`` px from its origin; each block takes the
    probability of the 48 px window centred on it (the tile reads that far past its core;
    past the raster's edge the composite is mirrored), so a block's value does not depend
    on the tile it falls in. The composite's B04, B03, B02 are rendered as the chips were
    (``ml.chips.render``, the offsets recorded with the model). Pixels without a clear
    look stay NaN.
    """
    from rasterio.windows import Window

    from ml.chips import CHIP, render, screen

    assert job.record is not None
    rendering = job.record.config["rendering"]
    s = int(job.record.config["stride"])
    m = (CHIP - s) // 2
    b_r0, b_r1 = core.row0 // s, (core.row1 - 1) // s + 1
    b_c0, b_c1 = core.col0 // s, (core.col1 - 1) // s + 1
    rows = (b_r0 * s - m, (b_r1 - 1) * s - m + CHIP)
    cols = (b_c0 * s - m, (b_c1 - 1) * s - m + CHIP)
    r0, r1 = max(0, rows[0]), min(job.height, rows[1])
    c0, c1 = max(0, cols[0]), min(job.width, cols[1])
    names = list(src.descriptions)
    missing = [b for b in rendering["bands"] if b not in names]
    if missing:
        raise ValueError(f"composite {job.composite} lacks band(s) {', '.join(missing)} for the screening detector")  # fmt: skip
    idx = [names.index(b) + 1 for b in rendering["bands"]]
    rgb = src.read(idx, window=Window(c0, r0, c1 - c0, r1 - r0), out_dtype="float32")
    pad = ((0, 0), (r0 - rows[0], rows[1] - r1), (c0 - cols[0], cols[1] - c1))
    if any(p for ax in pad for p in ax):
        rgb = np.pad(rgb, pad, mode="reflect")
    img = render(rgb, tuple(rendering["offsets"]))
    blocks = screen(_model(job)[0], img, s, device=dev)
    full = np.repeat(np.repeat(blocks, s, axis=0), s, axis=1)
    out = full[
        core.row0 - b_r0 * s : core.row1 - b_r0 * s, core.col0 - b_c0 * s : core.col1 - b_c0 * s
    ]
    clear = np.isfinite(img[:, core.row0 - rows[0] : core.row1 - rows[0], core.col0 - cols[0] : core.col1 - cols[0]]).all(axis=0)  # fmt: skip
    return np.where(clear, out, np.nan).astype(np.float32)


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
    tile_px: int = 0,
    client: Client | Callable[[], Client] | None = None,
    progress: Callable[[str], None] = print,
    why: str = "",
) -> ProbabilityResult:
    """Mining probability COG for one composite, from ``record`` or the index baseline.
    ``why``: how the model was chosen (``choose_model``), kept in the COG's tags with the
    model's domain and held-out figures.

    Processing tiles of ``tile_px`` (0: ``DEFAULT_TILE``; ``GPU_TILE`` on CUDA) run as
    dask tasks on ``client`` (in this process without one; a factory is called only
    when there is more than one tile), each reading its composite
    window; ``tile`` is the largest inference window (the model's own tiling, the same
    plan whatever ``tile_px``), so the output does not depend on ``tile_px``.
    """
    src = composite_path(root, region.id, period_id)
    if not src.exists():
        raise DetectionError(
            f"no composite at {src}: materialise `composite` for {region.id}/{period_id} first"
        )
    started = time.perf_counter()
    dev = pick_device(device)
    try:
        with rasterio.open(src) as ds:
            height, width, transform, crs = ds.height, ds.width, ds.transform, ds.crs
            feature_indexes(ds, src)
    except (rasterio.errors.RasterioError, CPLE_BaseError) as e:
        raise _damaged(src, region, period_id, e) from e
    tiling = Tiling(height, width, check_tile_size(tile_px or _auto_tile(dev.type)))
    cluster = resolve_client(client, tiling.n_tiles)
    resources = None
    if cluster is not None and gpu_workers(cluster):  # tasks go to the GPU workers
        import torch

        dev, resources = torch.device("cuda"), {"GPU": 1.0}
        tiling = Tiling(height, width, check_tile_size(tile_px or _auto_tile(dev.type)))
    truth = world_dir(root, region) / "truth" / f"{period_id}.tif"
    threshold = THRESHOLD if record is None else float(record.metrics.get("threshold", THRESHOLD))
    job = ProbabilityJob(
        composite=str(src), root=str(root), record=record, height=height, width=width,
        threshold=threshold, device=dev.type, infer_tile=tile, overlap=overlap, batch=batch,
        dtype=dtype, compile=compile,
        truth=str(truth) if region.source == "embedded" and truth.exists() else None,
    )  # fmt: skip
    where = "in this process" if cluster is None else "as dask tasks"
    if record is None:
        progress("mining_probability: no trained model registered; using the index baseline")
        detector = "index-baseline"
    elif record.kind == "chips":
        stride = int(record.config["stride"])
        progress(
            f"mining_probability: SCREENING with the chip classifier {record.model_id} on {dev}: "
            f"each {stride} x {stride} px block gets the probability of the 48 px window "
            f"centred on it, from B04/B03/B02 rendered as 8-bit L1C chips "
            f"(offsets {record.config['rendering']['offsets']}); threshold {threshold:.3f}. "
            "Blocks, not mined pixels: areas are an upper bound of the mined land"
        )
        detector = record.model_id
    else:
        infer = tile or INFER_DEFAULTS[dev.type][0]
        plan = plan_tiles(height, width, infer, overlap)
        progress(
            f"mining_probability: {record.model_id} on {dev}: {plan.n_tiles} inference windows "
            f"of {plan.tile_h} x {plan.tile_w} px, overlap >= {overlap}, batch "
            f"{batch or INFER_DEFAULTS[dev.type][1]}"
            + (f", {dtype}{' compiled' if compile else ''}" if dev.type == "cuda" else "")
        )
        detector = record.model_id
    progress(f"mining_probability: {tiling.describe()}, {where}")
    report = Progress("mining_probability", tiling.n_tiles, progress, unit="tiles done")
    target = probability_path(root, region.id, period_id)
    profile = {
        "width": width, "height": height, "count": 1, "dtype": "float32", "crs": crs,
        "transform": transform, "nodata": float("nan"), "predictor": 3,
    }  # fmt: skip
    # Tiles return their windows' sums over their core and up to a window past it; a
    # core is final (written, counted) once every tile reaching into it has returned.
    tiles = tiling.tiles()
    reach = {t.key: tile_extent(t.core, _windows(job, dev.type, t.core)) for t in tiles}
    cores = {(t.row, t.col): t for t in tiles}
    waiting: dict[tuple[int, int], int] = {k: 0 for k in cores}
    for t in tiles:
        for k in _cores_under(reach[t.key], tiling):
            waiting[k] += 1
    sums: dict[tuple[int, int], npt.NDArray[np.float32]] = {}
    stats = _ProbabilityStats(threshold)
    used = set()
    t_infer = time.perf_counter()
    labels = LabelSource(Path(job.truth), crs) if job.truth is not None else None
    try:
        with staged_cog(target, profile, progress=progress) as dst:
            dst.set_band_description(1, "mining_probability")
            done = run_tiles(
                probability_tile, tiles, job, client=cluster, resources=resources,
                name=f"probability-{region.id}-{period_id}",
            )  # fmt: skip
            for n_done, (_tile, out) in enumerate(done, start=1):
                used.add(out.device)
                for k in _cores_under(out.span, tiling):
                    core = cores[k].core
                    acc = sums.setdefault(k, np.zeros(core.shape, np.float32))
                    lo = Span(
                        max(core.row0, out.span.row0), min(core.row1, out.span.row1),
                        max(core.col0, out.span.col0), min(core.col1, out.span.col1),
                    )  # fmt: skip
                    acc[lo.within(core)] += out.part[lo.within(out.span)]
                    waiting[k] -= 1
                    if waiting[k] == 0:
                        prob = np.clip(sums.pop(k), 0.0, 1.0)
                        dst.write(prob, 1, window=core.window)
                        stats.add(prob, labels, dst.window_transform(core.window))
                report(n_done)
            import json

            tags = {"asmwatch_detector": detector, "asmwatch_threshold": str(threshold)}
            if why:
                tags["asmwatch_model_choice"] = why
            if record is not None:
                tags["asmwatch_model_domain"] = json.dumps(record.domain, sort_keys=True)
                tags["asmwatch_model_kind"] = record.kind
                held = record.metrics.get("heldout", {})
                if "iou" in held:
                    tags["asmwatch_model_heldout_iou"] = f"{float(held['iou']):.4f}"
                if record.kind == "chips":
                    tags["asmwatch_screening"] = "true"
                    tags["asmwatch_screening_block_px"] = str(record.config["stride"])  # fmt: skip
                    # what the classifier is made of, for the report's methods
                    if "seeds" in record.config:
                        tags["asmwatch_screening_members"] = str(record.config["seeds"])
                    tags["asmwatch_screening_trees"] = "true" if record.config.get("trees") else "false"  # fmt: skip
                    tags["asmwatch_rendering"] = json.dumps(record.config["rendering"], sort_keys=True)  # fmt: skip
                    tags["asmwatch_model_heldout"] = json.dumps(held, sort_keys=True)
            dst.update_tags(**tags)
    except TileReadError as e:
        raise DetectionError(
            f"the composite {e}: it is damaged or cut short. Re-materialise `composite` for "
            f"{region.id}/{period_id}; `asmwatch doctor` lists every damaged file"
        ) from e
    except (rasterio.errors.RasterioError, CPLE_BaseError) as e:
        raise _damaged(src, region, period_id, e) from e
    finally:
        if labels is not None:
            labels.close()
    if record is not None:
        progress(
            f"mining_probability: {height * width / 1e6:.1f} Mpx in "
            f"{time.perf_counter() - t_infer:.2f} s"
        )
    px_ha = abs(transform.a * transform.e) / 10_000
    total = height * width
    return ProbabilityResult(
        path=target,
        detector=detector,
        device=",".join(sorted(used)) or dev.type,
        mean_probability=stats.prob_sum / stats.valid if stats.valid else 0.0,
        mining_fraction=stats.mining / stats.valid if stats.valid else 0.0,
        mining_ha=round(stats.mining * px_ha, 2),
        valid_fraction=stats.valid / total,
        seconds=time.perf_counter() - started,
        metrics=scores(*(int(v) for v in stats.cm)) if job.truth is not None else None,
        truth_ha=round(stats.truth_mining * px_ha, 2) if job.truth is not None else None,
        threshold=threshold,
        tiles=tiling.n_tiles,
        tile_px=tiling.size,
        screening=record is not None and record.kind == "chips",
    )


def _cores_under(span: Span, tiling: Tiling) -> list[tuple[int, int]]:
    """(row, col) of the tile cores ``span`` overlaps."""
    size = tiling.size
    return [
        (r, c)
        for r in range(span.row0 // size, (span.row1 - 1) // size + 1)
        for c in range(span.col0 // size, (span.col1 - 1) // size + 1)
    ]


@dataclass
class _ProbabilityStats:
    """The partition's figures, summed over finished cores."""

    threshold: float
    valid: int = 0
    mining: int = 0
    prob_sum: float = 0.0
    truth_mining: int = 0
    cm: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros(4, np.int64))

    def add(
        self, prob: npt.NDArray[np.float32], labels: LabelSource | None, transform: Any
    ) -> None:
        valid = np.isfinite(prob)
        self.valid += int(valid.sum())
        self.mining += int((valid & (prob >= self.threshold)).sum())
        self.prob_sum += float(np.sum(prob[valid], dtype=np.float64))
        if labels is not None:
            y = labels.read(transform, valid)
            self.cm += np.asarray(confusion(prob, y, self.threshold))
            self.truth_mining += int((y == 1).sum())


def _auto_tile(device_type: str) -> int:
    return GPU_TILE if device_type == "cuda" else DEFAULT_TILE


def _damaged(src: Path, region: Region, period_id: str, e: Exception) -> DetectionError:
    return DetectionError(
        f"the composite {src} cannot be read ({first_line(e)}): it is damaged or cut short. "
        f"Re-materialise `composite` for {region.id}/{period_id}; `asmwatch doctor` "
        "lists every damaged file"
    )
