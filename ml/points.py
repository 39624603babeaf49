"""Point labels: positive and negative sample locations, as Amazon Mining Watch publishes.

A point labels file is a vector file (GeoJSON, GeoPackage, GeoParquet, zipped Shapefile)
of Point features, each with a ``label``: ``1`` / ``true`` / ``"mining"`` for a location
on mined land, ``0`` / ``false`` / ``"not mining"`` for one that is not. A point may say
when it holds: a ``period`` (``2021``, ``2021Q3``) or AMW's ``composite_start`` and
``composite_end`` dates (end exclusive); it then labels only the periods whose dates
overlap that time. A point without either (or with both dates empty) labels every
period.

Each point labels a small square window of the composite's grid around it
(``POINT_RADIUS_PX`` pixels each way: 5 x 5 px, 50 m at 10 m); every other pixel is
unknown (``IGNORE``), so the loss, early stopping and the threshold see only the labelled
windows. Where a mining and a not-mining window overlap, the overlap is unknown. In
training chips, a window pixel that does not look like its point's own pixel is unknown
too (``gate_windows``): a point on a mine's edge labels the mine, not the forest beside.

A file is checked in full before any training: points only (no polygons mixed in), a
``label`` on every point with a known value, at least one point of each class, readable
times, and (``outside_aoi``) every point inside the region's AOI. Each error names the
file and the features.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import rasterio

#: A point labels the (2r+1)^2 px window around its pixel: 5 x 5. With the similarity gate
#: below, 5 x 5 windows train better models than 3 x 3 (held-out IoU 0.94-0.95 of the
#: dense-label model's against 0.89-0.94; docs/detection.md).
POINT_RADIUS_PX = 2
#: A window pixel takes its point's label only if it looks like the point's own pixel: the
#: root mean square difference of their normalised features (units of each feature's
#: spread over the training composites) at most this. Points on a mine's edge otherwise
#: label forest as mining and the model over-maps every edge (docs/detection.md).
POINT_SIMILARITY = 1.0
LABEL_COLUMN = "label"
MINING_WORDS = {"1": 1, "true": 1, "mining": 1, "0": 0, "false": 0, "not mining": 0, "not_mining": 0}  # fmt: skip
SHOWN = 5  # features named in an error before "and N more"


class LabelsError(ValueError):
    """A mining labels file (points or polygons) that cannot be used; the message names
    the file and the features."""


def _features(indexes: list[int]) -> str:
    head = ", ".join(str(i) for i in indexes[:SHOWN])
    more = f" and {len(indexes) - SHOWN} more" if len(indexes) > SHOWN else ""
    return f"feature{'s' if len(indexes) > 1 else ''} {head}{more}"


def label_value(value: Any) -> int | None:
    """1 (mining) or 0 (not mining) for a label as files write it; None if unknown."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float, np.integer, np.floating)):
        return int(value) if value in (0, 1) else None
    if isinstance(value, str):
        return MINING_WORDS.get(value.strip().lower())
    return None


@dataclass(frozen=True)
class PointLabels:
    """The validated points of one file in one CRS: coordinates, labels, when they hold,
    and each point's feature index in the file (for messages)."""

    path: Path
    x: npt.NDArray[np.float64]
    y: npt.NDArray[np.float64]
    label: npt.NDArray[np.uint8]
    start: npt.NDArray[Any] | None  # datetime64[D], inclusive; None: every period
    end: npt.NDArray[Any] | None  # datetime64[D], exclusive
    feature: npt.NDArray[np.int64]

    def __len__(self) -> int:
        return len(self.label)

    def during(self, start: dt.date | None, end: dt.date | None) -> PointLabels:
        """The points that hold in the period [start, end] (inclusive dates); all of
        them when the file gives no times or no dates are given."""
        if self.start is None or self.end is None or start is None or end is None:
            return self
        always = np.isnat(self.start)
        keep = always | (self.start <= np.datetime64(end, "D")) & (
            self.end > np.datetime64(start, "D")
        )
        return self._subset(keep)

    def _subset(self, keep: npt.NDArray[np.bool_]) -> PointLabels:
        return PointLabels(
            self.path, self.x[keep], self.y[keep], self.label[keep],
            None if self.start is None else self.start[keep],
            None if self.end is None else self.end[keep],
            self.feature[keep],
        )  # fmt: skip

    def pixels(self, transform: rasterio.Affine) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:  # fmt: skip
        """(rows, cols) of each point's pixel on the grid of ``transform``."""
        cols, rows = ~transform * (self.x, self.y)
        return np.floor(rows).astype(np.int64), np.floor(cols).astype(np.int64)

    def burn(self, transform: rasterio.Affine, shape: tuple[int, int], ignore: int) -> npt.NDArray[np.uint8]:  # fmt: skip
        """Labels on a grid: each point's window 1 or 0, overlaps of both and every
        other pixel ``ignore``."""
        rows, cols = self.pixels(transform)
        h, w = shape
        r = POINT_RADIUS_PX
        near = (rows >= -r) & (rows < h + r) & (cols >= -r) & (cols < w + r)
        rows, cols, labels = rows[near], cols[near], self.label[near]
        hit = np.zeros((2, h, w), dtype=bool)  # [not mining, mining]
        for dr in range(-r, r + 1):
            for dc in range(-r, r + 1):
                rr, cc = rows + dr, cols + dc
                inside = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
                hit[labels[inside], rr[inside], cc[inside]] = True
        out = np.full(shape, ignore, dtype=np.uint8)
        out[hit[0]] = 0
        out[hit[1]] = 1
        out[hit[0] & hit[1]] = ignore
        return out


def gate_windows(
    labels: npt.NDArray[np.uint8],
    features: npt.NDArray[np.float32],
    rows: npt.NDArray[np.int64],
    cols: npt.NDArray[np.int64],
    point_labels: npt.NDArray[np.uint8],
    ignore: int,
    similarity: float = POINT_SIMILARITY,
) -> npt.NDArray[np.uint8]:
    """``labels`` (burnt point windows on a chip) with each window pixel that does not
    look like its point's own pixel set to ``ignore``: the root mean square difference
    of their normalised ``features`` (bands, y, x) above ``similarity``, or either
    not finite. ``rows``, ``cols``: the points' pixels on the chip (any, inside or not);
    a point's own pixel keeps its label."""
    h, w = labels.shape
    r = POINT_RADIUS_PX
    inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
    rows, cols, point_labels = rows[inside], cols[inside], point_labels[inside]
    out = labels.copy()
    if not len(rows):
        return out
    centre = features[:, rows, cols]  # (bands, points)
    for dr in range(-r, r + 1):
        for dc in range(-r, r + 1):
            if not (dr or dc):
                continue
            rr, cc = rows + dr, cols + dc
            ok = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
            rr, cc = rr[ok], cc[ok]
            own = out[rr, cc] == point_labels[ok]  # still this point's label (no conflict)
            with np.errstate(invalid="ignore"):
                d = np.sqrt(np.mean((features[:, rr, cc] - centre[:, ok]) ** 2, axis=0))
            unlike = own & ~(d <= similarity)
            out[rr[unlike], cc[unlike]] = ignore
    out[rows, cols] = labels[rows, cols]  # a point's own pixel, whatever its neighbours
    return out


def is_point_file(frame: Any, path: Path) -> bool:
    """True for a file of points, False for polygons; an error for a mix (or anything
    else), naming the features."""
    kinds = frame.geometry.geom_type.fillna("empty").tolist()
    points = [i for i, k in enumerate(kinds) if k in ("Point", "MultiPoint")]
    polys = [i for i, k in enumerate(kinds) if k in ("Polygon", "MultiPolygon", "GeometryCollection")]  # fmt: skip
    if points and polys:
        raise LabelsError(
            f"mining labels file {path} mixes points ({_features(points)}) and polygons "
            f"({_features(polys)}): use polygons (mined land; everything else counts as not "
            "mining) or labelled points (each a sample, 1 or 0), one kind per file"
        )
    return bool(points)


def read_points(frame: Any, path: Path, crs: Any) -> PointLabels:
    """Validate a frame of points (see the module's rules) and project it to ``crs``."""
    import pandas as pd

    where = f"mining labels file {path}"
    frame = frame.explode(index_parts=False)  # MultiPoints: one row per point, same label
    feature = frame.index.to_numpy(np.int64)
    frame = frame.reset_index(drop=True)
    empty = frame.geometry.is_empty | frame.geometry.isna()
    if empty.any():
        raise LabelsError(
            f"{where}: {_features(sorted(set(feature[empty.to_numpy()].tolist())))} "
            "have no coordinates"
        )
    if LABEL_COLUMN not in frame.columns:
        others = [str(c) for c in frame.columns if c != frame.geometry.name]
        raise LabelsError(
            f"{where}: point labels need a `{LABEL_COLUMN}` property on every point, 1 "
            f"(mining) or 0 (not mining); the file has {', '.join(others) or 'no properties'} "
            "(a file of one class only, as AMW's positives, needs the label added and the "
            "other class's points merged in)"
        )
    raw = frame[LABEL_COLUMN].tolist()
    values = [label_value(v) for v in raw]
    bad = [i for i, v in enumerate(values) if v is None]
    if bad:
        shown = sorted({repr(raw[i]) for i in bad})[:SHOWN]
        raise LabelsError(
            f"{where}: {_features(sorted(set(feature[bad].tolist())))}: unknown label "
            f"value(s) {', '.join(shown)}; use 1, true or 'mining' for mined land and 0, "
            "false or 'not mining' for land that is not"
        )
    label = np.asarray(values, dtype=np.uint8)
    n_mining, n_not = int(label.sum()), int((label == 0).sum())
    if n_not == 0 or n_mining == 0:
        missing = "negative (label 0, not mining)" if n_not == 0 else "mining (label 1)"
        raise LabelsError(
            f"{where}: {n_mining} mining and {n_not} not-mining points, no {missing} point: "
            "a model needs both to learn the difference (add points on forest, rivers, "
            "riverbanks, farmland and towns as negatives, on mined land as positives)"
        )
    start = end = None
    if "period" in frame.columns:
        start, end = _period_times(frame["period"].tolist(), feature, where)
    elif {"composite_start", "composite_end"} <= set(frame.columns):
        start, end = _date_times(frame, feature, where, pd)
    frame = frame.to_crs(crs)
    return PointLabels(
        path, frame.geometry.x.to_numpy(np.float64), frame.geometry.y.to_numpy(np.float64),
        label, start, end, feature,
    )  # fmt: skip


def _period_times(values: list[Any], feature: npt.NDArray[np.int64], where: str) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:  # fmt: skip
    from pipelines.regions import parse_period

    starts, ends = [], []
    for i, v in enumerate(values):
        try:
            p = parse_period(v if isinstance(v, (dict, int)) else str(v))
        except ValueError as e:
            raise LabelsError(
                f"{where}: feature {feature[i]}: period {v!r} is not a period ({e})"
            ) from None
        starts.append(p.start)
        ends.append(p.end + dt.timedelta(days=1))
    return np.array(starts, dtype="datetime64[D]"), np.array(ends, dtype="datetime64[D]")


def _date_times(frame: Any, feature: npt.NDArray[np.int64], where: str, pd: Any) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:  # fmt: skip
    out = []
    blank = [frame[c].isna().to_numpy() | (frame[c].astype(str).str.strip() == "").to_numpy() for c in ("composite_start", "composite_end")]  # fmt: skip
    half = np.flatnonzero(blank[0] != blank[1])
    if len(half):
        raise LabelsError(
            f"{where}: {_features(sorted(set(feature[half].tolist())))}: one of composite_start "
            "and composite_end is empty; give both (the point holds then) or neither (always)"
        )
    for column, empty in zip(("composite_start", "composite_end"), blank, strict=True):
        parsed = pd.to_datetime(frame[column].where(~empty), errors="coerce", utc=True)
        bad = parsed.isna().to_numpy() & ~empty
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise LabelsError(
                f"{where}: {_features(sorted(set(feature[bad].tolist())))}: {column} "
                f"{frame[column].iloc[i]!r} is not a date (ISO 8601, e.g. 2020-01-01)"
            )
        out.append(parsed.dt.tz_convert(None).to_numpy().astype("datetime64[D]"))
    start, end = out
    backwards = np.flatnonzero(end <= start)  # NaT (no dates: always) compares False
    if len(backwards):
        raise LabelsError(
            f"{where}: {_features(sorted(set(feature[backwards].tolist())))}: composite_end "
            "is not after composite_start"
        )
    return start, end


def outside_aoi(points: PointLabels, geometry: Any, region_id: str) -> None:
    """An error naming the points (in EPSG:4326) that lie outside the region's AOI."""
    import shapely

    aoi = shapely.geometry.shape(geometry)
    inside = shapely.intersects_xy(aoi, points.x, points.y)  # the boundary counts as inside
    out = sorted(set(points.feature[~inside].tolist()))
    if out:
        raise LabelsError(
            f"mining labels file {points.path}: {len(out)} of {len(points)} points lie "
            f"outside region {region_id!r}'s AOI ({_features(out)}): clip the file to the "
            "AOI, or widen the AOI; points outside it would label imagery that is not read"
        )
