"""Model inputs from a composite COG, and labels from a truth raster, on one grid.

Fourth step of the flow (composite -> **probability**). The detector sees the composite's
six median reflectance bands and its three indices (not the clear count, which says how
often the sky was clear, not what is on the ground). Missing values (no clear look)
become 0 after normalisation and are flagged in a validity mask, so a model never sees
NaN and metrics skip those pixels.
"""

from __future__ import annotations

import datetime as dt
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import rasterio
import rasterio.warp
from rasterio.enums import Resampling

from ml.points import LabelsError, PointLabels, is_point_file, read_points

#: Composite bands the model reads, in channel order.
FEATURE_BANDS: tuple[str, ...] = ("B02", "B03", "B04", "B08", "B11", "B12", "NDVI", "MNDWI", "BSI")
IGNORE = 255  # label value that counts neither way


@dataclass(frozen=True)
class Normalizer:
    """Per-channel mean and std, learned from training pixels and saved with the model."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def apply(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """(c, y, x) float with NaN -> normalised, NaN set to 0 (the mean)."""
        m = np.asarray(self.mean, np.float32)[:, None, None]
        s = np.asarray(self.std, np.float32)[:, None, None]
        out = (x - m) / s
        return np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)

    @classmethod
    def fit(cls, arrays: list[npt.NDArray[np.float32]]) -> Normalizer:
        stack = np.concatenate([a.reshape(a.shape[0], -1) for a in arrays], axis=1)
        mean = np.nanmean(stack, axis=1)
        std = np.nanstd(stack, axis=1)
        std[~np.isfinite(std) | (std < 1e-6)] = 1.0
        mean[~np.isfinite(mean)] = 0.0
        return cls(tuple(float(v) for v in mean), tuple(float(v) for v in std))


@dataclass
class Scene:
    """One composite as model input: features (c, y, x), validity, grid."""

    features: npt.NDArray[np.float32]  # raw (not normalised), NaN where no data
    valid: npt.NDArray[np.bool_]
    transform: rasterio.Affine
    crs: rasterio.crs.CRS


def feature_indexes(src: Any, path: Path | str) -> list[int]:
    """1-based band indexes of ``FEATURE_BANDS`` in an open composite, by band name."""
    names = list(src.descriptions)
    missing = [b for b in FEATURE_BANDS if b not in names]
    if missing:
        raise ValueError(f"composite {path} lacks band(s) {', '.join(missing)} (has {names})")
    return [names.index(b) + 1 for b in FEATURE_BANDS]


def read_features(
    src: Any, path: Path | str, window: Any = None, *, pinned: bool = False, dtype: Any = np.float32
) -> npt.NDArray[Any]:
    """The feature bands of an open composite, whole or in a ``window`` (a ``Span``).

    ``pinned``: read into page-locked host memory (``ml.infer.pinned_empty``), from which
    the CUDA inference path uploads while it computes. ``dtype`` float16 halves what
    goes over the bus (reflectance keeps 3 significant digits, finer than the model's
    fp16 arithmetic needs). A window that cannot be read names the file and the window.
    """
    from pipelines.infra.tiling import Span, read_window

    indexes = feature_indexes(src, path)
    span = window if window is not None else Span(0, src.height, 0, src.width)
    if pinned:
        from ml.infer import pinned_empty

        data = pinned_empty((len(indexes), *span.shape), dtype)
        for k, index in enumerate(indexes):  # band by band: no full float32 copy
            data[k] = read_window(src, index, span, path, out_dtype=np.float32)
        return data
    return read_window(src, indexes, span, path, out_dtype=dtype)


def read_composite(path: Path, *, pinned: bool = False, dtype: Any = np.float32) -> Scene:
    """The feature bands of a whole composite COG (small rasters and tests only: the
    stages read windows, ``read_features``)."""
    with rasterio.open(path) as src:
        data = read_features(src, path, pinned=pinned, dtype=dtype)
        valid = np.isfinite(data).all(axis=0)
        return Scene(features=data, valid=valid, transform=src.transform, crs=src.crs)


VECTOR_SUFFIXES = (".geojson", ".json", ".gpkg", ".parquet", ".shp")


def read_labels(
    path: Path, like: Scene, mining_values: tuple[int, ...] = (1,), period: str | None = None
) -> npt.NDArray[np.uint8]:
    """Labels on the scene's grid: 1 mining, 0 not, ``IGNORE`` unknown.

    ``path`` is a truth raster (the embedded world's: 1 mining, 2 re-vegetating, 255 no
    data), mining polygons (GeoJSON, GeoPackage, GeoParquet), rasterised by
    ``rasterize_labels``, or labelled points (``ml.points``: only their windows known).
    """
    with LabelSource(path, like.crs, period, mining_values) as source:
        return source.read(like.transform, like.valid)


class LabelSource:
    """Labels of one file, read window by window onto a grid (training chips, tiles).

    A truth raster stays open and is warped per window (GDAL reads what the window
    needs); polygons are read, validated and projected once, then burnt per window;
    labelled points (``ml.points``) likewise, each burning a small window, the rest
    unknown. ``kind`` says which: ``raster``, ``polygons`` or ``points``.

    ``period`` selects the polygons and points that hold then; points with dates need
    the period's ``dates`` (start, end inclusive) unless the id is a year or a quarter.
    """

    def __init__(
        self,
        path: Path,
        crs: Any,
        period: str | None = None,
        mining_values: tuple[int, ...] = (1,),
        dates: tuple[dt.date, dt.date] | None = None,
    ) -> None:
        self.path, self.crs, self.mining_values = path, crs, mining_values
        self._src: Any = None
        self._shapes: list[tuple[Any, int]] | None = None
        self.points: PointLabels | None = None
        self.kind = "raster"
        if path.suffix.lower() in VECTOR_SUFFIXES:
            frame = labels_frame(path)
            if is_point_file(frame, path):
                self.kind = "points"
                self.points = read_points(frame, path, crs).during(*_dates(path, period, dates))
            else:
                self.kind = "polygons"
                self._shapes = label_shapes(path, crs, period, frame=frame)
        else:
            self._src = rasterio.open(path)

    def __enter__(self) -> LabelSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._src is not None:
            self._src.close()
            self._src = None

    def read(
        self, transform: rasterio.Affine, valid: npt.NDArray[np.bool_]
    ) -> npt.NDArray[np.uint8]:
        """Labels (1, 0, ``IGNORE``) on the grid of ``transform`` and ``valid``'s shape,
        ``IGNORE`` where ``valid`` is False."""
        import rasterio.features

        shape = valid.shape
        if self.points is not None:
            out = self.points.burn(transform, shape, IGNORE)
        elif self._shapes is not None:
            out = np.zeros(shape, dtype=np.uint8)
            if self._shapes:
                out = rasterio.features.rasterize(
                    self._shapes, out_shape=shape, transform=transform, fill=0, dtype="uint8"
                )
        else:
            raw = np.full(shape, IGNORE, dtype=np.uint8)
            rasterio.warp.reproject(  # from the band: GDAL reads only what the grid needs
                rasterio.band(self._src, 1), raw, src_nodata=self._src.nodata,
                dst_transform=transform, dst_crs=self.crs,
                dst_nodata=IGNORE, resampling=Resampling.nearest,
            )  # fmt: skip
            out = np.full(shape, IGNORE, dtype=np.uint8)
            known = raw != IGNORE
            out[known] = np.isin(raw[known], self.mining_values).astype(np.uint8)
        out[~valid] = IGNORE
        return out


def rasterize_labels(path: Path, like: Scene, period: str | None = None) -> npt.NDArray[np.uint8]:
    """Mining polygons burnt onto the scene's grid: 1 inside, 0 outside, nodata ignored.

    Polygons with a ``period`` property (AMW's "new mining by period" layers) count when
    their period is not after ``period`` (same-year quarters included): mining that
    appeared by then. Without ``period``, every polygon counts.
    """
    with LabelSource(path, like.crs, period) as source:
        return source.read(like.transform, like.valid)


def labels_frame(path: Path) -> Any:
    """A mining labels file as read by ``read_vector`` (errors naming the file), read once
    per version of the file: training opens it per composite and per use. Callers
    derive new frames from it and never change it in place."""
    return _labels_frame(path, path.stat().st_mtime_ns if path.exists() else -1)


@functools.lru_cache(maxsize=8)
def _labels_frame(path: Path, _mtime_ns: int) -> Any:
    from pipelines.infra.vectors import read_vector

    return read_vector(path, "mining labels file", LabelsError)


def _dates(
    path: Path, period: str | None, dates: tuple[dt.date, dt.date] | None
) -> tuple[dt.date | None, dt.date | None]:
    """The inclusive dates of ``period`` for choosing timed points (None, None: all)."""
    from pipelines.regions import year_or_quarter

    if dates is not None:
        return dates
    if period is None:
        return None, None
    p = year_or_quarter(period)
    if p is None:
        raise LabelsError(
            f"mining labels file {path}: period {period!r} is neither a year nor a quarter "
            "and its dates were not given, so its timed points cannot be chosen"
        )
    return p.start, p.end


def label_shapes(
    path: Path, crs: Any, period: str | None = None, frame: Any = None
) -> list[tuple[Any, int]]:
    """The (geometry, 1) pairs of a mining labels file in ``crs``, validated, filtered to
    the polygons that count for ``period`` (see ``rasterize_labels``)."""
    from pipelines.infra.vectors import POLYGONAL, check_geometry
    from pipelines.regions import parse_period

    if frame is None:
        frame = labels_frame(path)
    geoms = [
        check_geometry(g, POLYGONAL, f"mining labels file {path}: feature {i}", LabelsError)[0]
        for i, g in enumerate(frame.geometry)
    ]
    frame = frame.set_geometry(geoms, crs=frame.crs)
    if "period" in frame.columns:
        for i, v in enumerate(frame["period"].tolist()):
            try:
                parse_period(v if isinstance(v, (dict, int)) else str(v))
            except ValueError as e:
                raise LabelsError(
                    f"mining labels file {path}: feature {i}: period {v!r} is not a period ({e})"
                ) from None
    if period is not None and "period" in frame.columns:
        year = period[:4]
        frame = frame[frame["period"].astype(str).str[:4] <= year]
    frame = frame.to_crs(crs)
    return [(g, 1) for g in frame.geometry if g is not None and not g.is_empty]
