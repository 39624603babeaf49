"""Context layers: protected areas, indigenous lands, concessions, settlements, rivers and
grievance logs from users' files, as GeoParquet tables with one schema.

A region's ``context`` in the regions file names a file per layer kind, either as a path
or as ``{file: path, <role>: <column>, ...}``. The roles (``CONTEXT_ROLES``) map the
file's own column names onto the table's columns. Unmapped roles fall back to the
usual names (``DEFAULTS``). Reading follows ``pipelines.infra.vectors``: the format, a CRS
(reprojected to EPSG:4326), at least one feature, the mapped columns present, and the
geometry kinds the layer takes. Invalid polygons are repaired with ``make_valid``
(counted in ``notes``). A geometry that is empty, or empty after repair, is an error
naming the feature: a reference layer silently losing a protected area would be worse
than a failed run. Grievance logs and settlements may be CSV with coordinate columns
(``lon``/``lat`` roles, ``crs`` for projected coordinates); each bad coordinate or date
is an error naming the row.

Every table has the columns of ``COLUMNS``. ``attributes`` keeps the rest of the source
row as JSON, so nothing of the user's data is lost, and ``source_file`` says where the
row came from. ``area_ha`` is measured in the region's UTM zone. Features are kept
whole, so the share of a protected area under mining refers to the whole area, but
only those that touch the AOI's bbox widened by ``KEEP_WITHIN_DEG`` (about 11 km) on
every side are kept (``keep_box``; the table's contract check uses the same box).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import shapely
import shapely.geometry

from pipelines.infra.grid import bbox_utm_epsg
from pipelines.infra.layout import context_table_path
from pipelines.infra.storage import atomic_path
from pipelines.infra.vectors import (
    LINEAR,
    POLYGONAL,
    PUNCTUAL,
    check_geometry,
    read_vector,
    require_columns,
)
from pipelines.regions import CONTEXT_ROLES, Region

log = logging.getLogger(__name__)

#: Layer kinds that become tables (``mining_labels`` and ``detections`` feed other stages).
TABLE_KINDS = ("protected_areas", "indigenous_lands", "concessions", "settlements", "rivers", "grievances")  # fmt: skip
GEOMETRIES: dict[str, tuple[str, ...]] = {
    "protected_areas": POLYGONAL,
    "indigenous_lands": POLYGONAL,
    "concessions": POLYGONAL,
    "settlements": PUNCTUAL + POLYGONAL,
    "rivers": LINEAR,
    "grievances": PUNCTUAL,
}
#: Column names tried, in order, for a role the regions file does not map.
DEFAULTS: dict[str, tuple[str, ...]] = {
    "id": ("id", "feature_id"),  # after the layer's own <thing>_id, see ID_COLUMNS
    "name": ("name",),
    "category": ("category", "kind", "designation", "type"),
    "holder": ("holder",),
    "status": ("status",),
    "population": ("population",),
    "date": ("date",),
    "place": ("place",),
    "concession": ("concession_id", "concession"),
    "lon": ("lon", "longitude", "x"),
    "lat": ("lat", "latitude", "y"),
}
REQUIRED: dict[str, tuple[str, ...]] = {
    "protected_areas": ("name",),
    "indigenous_lands": ("name",),
    "concessions": ("name",),
    "settlements": ("name",),
    "rivers": (),
    "grievances": ("date", "category"),
}
COLUMNS = (
    "region", "layer", "feature_id", "name", "category", "area_ha", "holder", "status",
    "population", "date", "place", "concession_id", "attributes", "source_file", "geometry",
)  # fmt: skip
KEEP_WITHIN_DEG = 0.1
CSV_SUFFIXES = (".csv",)

#: Grievance status words (English, Spanish, French, Portuguese), as ``status_key``
#: normalises them, and what they mean for the risk score: open grievances count.
#: A region's file may use others: map them with ``context.grievances.status_values``.
GRIEVANCE_STATUS: dict[str, str] = {
    **dict.fromkeys((
        "open", "opened", "pending", "unresolved", "in progress", "ongoing", "new",
        "received", "under review", "escalated", "reopened",
        "abierto", "abierta", "pendiente", "en proceso", "en tramite", "en curso",
        "sin resolver", "no resuelto", "no resuelta", "nuevo", "nueva", "recibido",
        "recibida", "en revision", "reabierto", "reabierta",
        "ouvert", "ouverte", "en cours", "en attente", "non resolu", "non resolue",
        "nouveau", "nouvelle", "recu", "recue", "en examen", "rouvert", "rouverte",
        "aberto", "aberta", "pendente", "em andamento", "em analise", "em curso",
        "nao resolvido", "nao resolvida", "novo", "nova", "recebido", "recebida",
        "reaberto", "reaberta",
    ), "open"),
    **dict.fromkeys((
        "closed", "resolved", "settled", "dismissed", "withdrawn", "rejected", "done",
        "cerrado", "cerrada", "resuelto", "resuelta", "archivado", "archivada",
        "desestimado", "desestimada", "retirado", "retirada", "rechazado", "rechazada",
        "ferme", "fermee", "resolu", "resolue", "clos", "close", "classe", "classee",
        "rejete", "rejetee", "retire", "retiree",
        "fechado", "fechada", "resolvido", "resolvida", "encerrado", "encerrada",
        "arquivado", "arquivada", "rejeitado", "rejeitada",
    ), "closed"),
}  # fmt: skip


def status_key(value: str) -> str:
    """A status as compared: Unicode-normalised, no accents, case-folded, single spaces
    (``' Abierta\u00a0'`` and ``'abierta'`` are the same; so are ``'en_proceso'`` and
    ``'en proceso'``)."""
    import re
    import unicodedata

    text = unicodedata.normalize("NFKD", value)
    text = "".join(c for c in text if not unicodedata.combining(c))
    return re.sub(r"[\s_\-]+", " ", text.casefold()).strip()


def grievance_states(
    values: list[str | None], mapping: dict[str, str], what: str, column: str
) -> tuple[list[str], int]:
    """Each grievance's status as ``open`` or ``closed``, and how many were blank.

    ``mapping`` (the regions file's ``status_values``) comes before the built-in words.
    A value neither knows is an error naming the row and the value: a grievance
    silently counted as closed would lower a concession's risk score.
    """
    known = dict(GRIEVANCE_STATUS)
    known.update({status_key(k): v for k, v in mapping.items()})
    out, blank = [], 0
    for i, v in enumerate(values):
        if v is None or not status_key(v):
            out.append("open")
            blank += 1
            continue
        state = known.get(status_key(v))
        if state is None:
            raise ContextError(
                f"{what}: row {i + 2}: status {v!r} ({column}) is not a known grievance "
                "status; map it in the regions file, e.g. context.grievances.status_values: "
                f"{{{v.strip()!r}: open}} (or closed). Known: open, pending, in progress, "
                "closed, resolved and their Spanish, French and Portuguese forms"
            )
        out.append(state)
    return out, blank


class ContextError(ValueError):
    """A context layer that cannot be used; the message names the file and feature or row."""


@dataclass
class ContextLayer:
    kind: str
    frame: Any  # GeoDataFrame with COLUMNS, EPSG:4326
    path: Path
    notes: list[str] = field(default_factory=list)
    dropped_far: int = 0


def keep_box(region: Region) -> Any:
    """Features that touch this box are kept, whole: the region's bbox widened by
    ``KEEP_WITHIN_DEG`` on every side. The tables' contract check uses the same box."""
    w, s, e, n = region.bbox
    k = KEEP_WITHIN_DEG
    return shapely.geometry.box(w - k, s - k, e + k, n + k)


ID_COLUMNS = {
    "protected_areas": "area_id", "indigenous_lands": "area_id", "concessions": "concession_id",
    "settlements": "settlement_id", "rivers": "river_id", "grievances": "grievance_id",
}  # fmt: skip


def _column(frame: Any, role: str, mapped: dict[str, str], kind: str = "") -> str | None:
    if role in mapped:
        return mapped[role]
    names = DEFAULTS.get(role, ())
    if role == "id" and kind in ID_COLUMNS:
        names = (ID_COLUMNS[kind], *names)
    return next((c for c in names if c in frame.columns), None)


def _read_csv(path: Path, kind: str, mapped: dict[str, str]) -> Any:
    """A GeoDataFrame from a CSV with coordinate columns; each bad row is named."""
    import geopandas as gpd
    import pandas as pd
    from pyproj import CRS
    from pyproj.exceptions import CRSError

    what = f"{kind} layer {path}"
    if not path.exists():
        raise ContextError(f"{what} does not exist")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as e:  # pandas raises several types for malformed CSV
        raise ContextError(f"{what}: cannot be read as CSV ({e})") from e
    if len(table) == 0:
        raise ContextError(f"{what} has no rows")
    lon_col, lat_col = _column(table, "lon", mapped), _column(table, "lat", mapped)
    if lon_col is None or lat_col is None:
        raise ContextError(
            f"{what}: no coordinate columns; map them with context.{kind}.lon and .lat "
            f"(columns: {', '.join(table.columns)})"
        )
    require_columns(table, [(f"context.{kind}.lon", lon_col), (f"context.{kind}.lat", lat_col)], what, ContextError)  # fmt: skip
    try:
        crs = CRS.from_user_input(mapped.get("crs", "EPSG:4326"))
    except CRSError as e:
        raise ContextError(
            f"{what}: context.{kind}.crs {mapped.get('crs')!r} is not a CRS ({e})"
        ) from e
    xs, ys = [], []
    for i, (x, y) in enumerate(zip(table[lon_col], table[lat_col], strict=True)):
        row = f"{what}: row {i + 2}"  # the header is line 1
        try:
            fx, fy = float(x), float(y)
        except ValueError:
            raise ContextError(f"{row}: coordinates ({x!r}, {y!r}) are not numbers") from None
        if not (math.isfinite(fx) and math.isfinite(fy)):
            raise ContextError(f"{row}: coordinates ({x!r}, {y!r}) are not finite")
        if crs.is_geographic and not (-180 <= fx <= 180 and -90 <= fy <= 90):
            raise ContextError(
                f"{row}: ({fx}, {fy}) is outside longitude -180..180 / latitude -90..90; "
                f"are {lon_col} and {lat_col} swapped or projected (set context.{kind}.crs)?"
            )
        xs.append(fx)
        ys.append(fy)
    return gpd.GeoDataFrame(table, geometry=gpd.points_from_xy(xs, ys), crs=crs)


def _json(row: dict[str, Any]) -> str:
    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, np.generic):
            return v.item()
        if isinstance(v, np.ndarray):
            return [clean(x) for x in v.tolist()]
        return v

    return json.dumps({k: clean(v) for k, v in row.items()}, default=str, ensure_ascii=False)


def read_context(region: Region, kind: str, path: Path) -> ContextLayer:
    """Read, check and normalise one context layer of ``region``."""
    import geopandas as gpd
    import pandas as pd

    if kind not in TABLE_KINDS:
        raise ContextError(f"{kind} is not a context table (tables: {', '.join(TABLE_KINDS)})")
    mapped = dict(region.context_fields.get(kind, {}))
    what = f"{kind} layer {path}"
    if path.suffix.lower() in CSV_SUFFIXES:
        if kind not in ("settlements", "grievances"):
            raise ContextError(f"{what}: CSV takes points; give {kind} as GeoJSON, GeoPackage, GeoParquet or zipped Shapefile")  # fmt: skip
        frame = _read_csv(path, kind, mapped)
    else:
        frame = read_vector(path, f"{kind} layer", ContextError)
    require_columns(frame, [(f"context.{kind}.{r}", c) for r, c in mapped.items() if r != "crs"], what, ContextError)  # fmt: skip
    roles = set(CONTEXT_ROLES[kind]) - {"lon", "lat"}
    cols = {r: _column(frame, r, mapped, kind) if r in roles else None for r in DEFAULTS}
    for role in REQUIRED[kind]:
        if cols[role] is None:
            others = [str(c) for c in frame.columns if c != frame.geometry.name]
            raise ContextError(
                f"{what}: no {role} column; map one with context.{kind}.{role} "
                f"(columns: {', '.join(others)})"
            )
    notes: list[str] = []
    frame = frame.to_crs(4326)
    geoms, repaired = [], 0
    for i, raw in enumerate(frame.geometry.tolist()):
        geom, fixed = check_geometry(raw, GEOMETRIES[kind], f"{what}: feature {i}", ContextError)
        if geom is None:
            raise ContextError(f"{what}: feature {i} has an empty geometry" + (" after repair" if fixed else ""))  # fmt: skip
        repaired += fixed
        geoms.append(geom)
    if repaired:
        notes.append(f"{repaired} invalid geometr{'y' if repaired == 1 else 'ies'} repaired")

    if cols["id"] is not None:
        ids = [str(v) for v in frame[cols["id"]].tolist()]
    else:
        ids = [f"{kind}-{i + 1:05d}" for i in range(len(frame))]
        notes.append(f"no id column: ids {kind}-00001... by row order (map context.{kind}.id)")
    seen: dict[str, int] = {}
    for i, fid in enumerate(ids):
        if not fid.strip():
            raise ContextError(f"{what}: feature {i} has an empty id ({cols['id']})")
        if fid in seen:
            raise ContextError(f"{what}: id {fid!r} is used by features {seen[fid]} and {i}; ids must be unique")  # fmt: skip
        seen[fid] = i

    def text(role: str, default: str | None = None) -> list[str | None]:
        col = cols[role]
        if col is None:
            return [default] * len(frame)
        return [None if (v is None or (isinstance(v, float) and math.isnan(v)) or v == "") else str(v) for v in frame[col].tolist()]  # fmt: skip

    dates: list[dt.date | None] = [None] * len(frame)
    states: list[str] = []
    if kind == "grievances":
        for i, v in enumerate(text("date")):
            try:
                dates[i] = dt.date.fromisoformat(str(v)[:10])
            except (TypeError, ValueError):
                raise ContextError(f"{what}: row {i + 2}: date {v!r} is not an ISO date (YYYY-MM-DD)") from None  # fmt: skip
        if cols["status"] is None:
            notes.append("no status column: every grievance is taken as open")
        else:
            states, blank = grievance_states(
                text("status"), dict(region.status_values), what, str(cols["status"])
            )
            if blank:
                notes.append(f"{blank} grievance(s) with an empty status taken as open")
    population: list[float | None] = [None] * len(frame)
    if cols["population"] is not None:
        for i, v in enumerate(text("population")):
            try:
                population[i] = None if v is None else float(v)
            except ValueError:
                raise ContextError(f"{what}: feature {i}: population {v!r} is not a number") from None  # fmt: skip

    used = {c for c in cols.values() if c is not None} | {frame.geometry.name}
    if kind == "grievances" and cols["status"] is not None:
        used.discard(cols["status"])  # the file's own wording stays in attributes
    rest = [c for c in frame.columns if c not in used]
    attributes = [_json(r) for r in frame[rest].to_dict("records")] if rest else ["{}"] * len(frame)
    epsg = bbox_utm_epsg(region.bbox)
    series = gpd.GeoSeries(geoms, crs=4326)
    polygons = GEOMETRIES[kind] == POLYGONAL
    areas = (
        (series.to_crs(epsg).area / 10_000).round(4).tolist() if polygons else [None] * len(frame)
    )
    out = gpd.GeoDataFrame(
        {
            "region": region.id,
            "layer": kind,
            "feature_id": ids,
            "name": text("name"),
            "category": text("category"),
            "area_ha": areas,
            "holder": text("holder"),
            "status": states
            if kind == "grievances" and cols["status"] is not None
            else text("status", "open" if kind == "grievances" else None),
            "population": population,
            "date": pd.array(dates, dtype="object"),
            "place": text("place"),
            "concession_id": text("concession"),
            "attributes": attributes,
            "source_file": str(path),
        },
        geometry=list(series),
        crs=4326,
    )
    near = out.intersects(keep_box(region))
    dropped = int((~near).sum())
    if dropped:
        notes.append(f"{dropped} feature(s) more than about 11 km from the AOI left out")
    out = out[near].reset_index(drop=True)
    for col in ("area_ha", "population"):
        out[col] = out[col].astype("float64")
    for col in ("region", "layer", "feature_id", "name", "category", "holder", "status", "place", "concession_id", "attributes", "source_file"):  # fmt: skip
        out[col] = out[col].astype("string")
    return ContextLayer(kind, out[list(COLUMNS)], path, notes, dropped)


def write_context(layer: ContextLayer, root: Path, region_id: str) -> Path:
    """GeoParquet (EPSG:4326, bbox covering), written atomically."""
    target = context_table_path(root, region_id, layer.kind)
    with atomic_path(target) as tmp:
        layer.frame.to_parquet(tmp, write_covering_bbox=True, index=False)
    return target


def context_for_region(
    root: Path, region: Region, say: Callable[[str], None] | None = None
) -> list[tuple[ContextLayer, Path]]:
    """Read every context layer the region lists, then write them all as GeoParquet
    under ``context/<region>/`` (nothing is written unless every layer reads: a
    ``ContextError`` names the file and the feature). A layer no longer listed loses
    its table. Returns each layer with the table it was written to."""
    from pipelines.embedded.source import context_path, ensure_world

    say = say or log.info
    if region.source == "embedded":  # the demo's layers live in its simulated world
        ensure_world(root, region, say)
    layers = []
    for kind in TABLE_KINDS:
        path = context_path(root, region, kind)
        if path is not None:
            layers.append(read_context(region, kind, path))
    written = [(layer, write_context(layer, root, region.id)) for layer in layers]
    kinds = {layer.kind for layer in layers}
    for kind in TABLE_KINDS:  # a layer removed from the regions file leaves no stale table
        stale = context_table_path(root, region.id, kind)
        if kind not in kinds and stale.exists():
            stale.unlink()
    return written
