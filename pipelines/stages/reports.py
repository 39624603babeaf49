"""Reports for people outside the team: an expansion map, a region report, a web map.

Everything here reads the published tables through the DuckDB catalog (the same views an
analyst queries) plus the composites for a true-colour backdrop, and writes three files
under ``<data root>/reports/<region>/``:

- ``expansion.png``: mining coloured by the period it was first seen (a colour per
  period, as ASMSpotter draws it) over the latest true-colour composite, with the
  protected areas, indigenous lands and concessions outlined and the area per period in
  the legend.
- ``report.html``: one self-contained page (the map embedded): area per period, growth,
  the concessions most at risk with every score component, ASM pressure on protected
  and indigenous areas, the latest alerts, notes and method.
- ``webmap.html``: one self-contained interactive map. Leaflet comes from the pinned
  ``xstatic-leaflet`` package and is inlined, the composites are embedded as images,
  so the page opens offline from a file, e-mail or USB stick. Layers per period, the
  context layers, alerts, and a period selector.

Nothing is fetched at run time. Every value taken from the data (names of areas,
holders, notes) is HTML-escaped by Jinja2's autoescape or serialised as JSON that the
page's script inserts as text, never as markup.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from pipelines import thresholds
from pipelines.i18n import Lang
from pipelines.infra.layout import report_dir, risk_path, sites_path
from pipelines.infra.storage import atomic_path
from pipelines.regions import Region

log = logging.getLogger(__name__)

REPORT_FILES = ("expansion.png", "report.html", "webmap.html")
#: The reports' words when no language is given: the messages themselves.
EN = Lang("en")
#: Longest side, in pixels, of the backdrop images (composites are read from overviews).
BACKDROP_PX = 1200
#: Coordinates in the web map are simplified to about a metre (1e-5 degrees).
WEB_SIMPLIFY_DEG = 1e-5
CONTEXT_STYLES = {  # layer -> colour: the same on the PNG and the web map (words: ``labels``)
    "protected_areas": "#1a9850",
    "indigenous_lands": "#984ea3",
    "concessions": "#222222",
}
#: Layers drawn only on the web map: rivers as lines, people and grievances as points.
WEB_ONLY_STYLES = {
    "rivers": "#2b83ba",
    "settlements": "#404040",
    "grievances": "#e66101",
}
#: The concession risk score's parts, in the order the tables give them.
COMPONENTS = tuple(thresholds.RISK_COMPONENT_MAX)


class ReportError(ValueError):
    """A report cannot be made (no catalog, nothing materialised for the region)."""


def period_colours(n: int) -> list[str]:
    """One colour per period, early to late (yellow to dark red, as ASMSpotter)."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    cmap = colormaps["YlOrRd"]
    if n == 1:
        return [to_hex(cmap(0.75))]
    return [to_hex(cmap(0.3 + 0.7 * i / (n - 1))) for i in range(n)]


@dataclass
class RegionData:
    """What the reports show of one region, read from the catalog."""

    region: Region
    periods: list[str]  # the region's periods that have a summary row, in order
    summary: list[dict[str, Any]]
    change: dict[str, list[dict[str, Any]]]  # period -> change rows with a shapely geometry
    context: dict[str, list[dict[str, Any]]]  # layer -> rows with a shapely geometry
    risk: dict[str, list[dict[str, Any]]]  # period -> concession_risk rows, by score
    pressure: dict[str, list[dict[str, Any]]]  # period -> protected_area_pressure rows
    alerts: dict[str, list[dict[str, Any]]]  # period -> listed alerts, by rank
    backdrops: dict[str, Path] = field(default_factory=dict)  # period -> composite COG
    #: period -> severity -> (alerts, ha) of every alert, listed or not
    alert_counts: dict[str, dict[str, tuple[int, float]]] = field(default_factory=dict)
    #: alert_id -> its alert_features rows (what it touches), for the listed alerts
    relations: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    #: data root -> ``imagery_facts`` (read once for the report and the web map)
    imagery_cache: dict[Path, list[Any]] = field(default_factory=dict, repr=False)

    def alert_total(self, period: str) -> int:
        return sum(n for n, _ in self.alert_counts.get(period, {}).values())

    def alert_rest(self, period: str) -> tuple[int, float]:
        """The alerts of ``period`` not listed, and their hectares."""
        listed = self.alerts.get(period, [])
        n = self.alert_total(period) - len(listed)
        ha = sum(h for _, h in self.alert_counts.get(period, {}).values()) - sum(a["area_ha"] for a in listed)  # fmt: skip
        return n, max(ha, 0.0)

    @property
    def latest(self) -> str:
        return self.periods[-1]


def _rows(con: Any, sql: str, params: list[Any]) -> list[dict[str, Any]]:
    cur = con.execute(sql, params)
    names = [d[0] for d in cur.description]
    return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]


def _has_view(con: Any, name: str) -> bool:
    return bool(
        con.execute(
            "SELECT count(*) FROM duckdb_views() WHERE view_name = ? AND NOT internal", [name]
        ).fetchone()[0]
    )


#: Point layers (settlements, grievance logs) beyond this many points reach the web map
#: as counts on a grid instead of one marker each: a million grievances would make a
#: page of hundreds of MB that no browser opens, and the report would hold them all.
POINT_LAYERS = ("settlements", "grievances")
MAX_POINTS = 5000


def _count(con: Any, view: str, region_id: str) -> int:
    if not _has_view(con, view):
        return 0
    return int(con.execute(f"SELECT count(*) FROM {view} WHERE region = ?", [region_id]).fetchone()[0])  # fmt: skip


def _cell_size(count_sql: Callable[[float], str], con: Any, params: list[Any], limit: int) -> float:
    """The grid cell edge, in degrees, doubling from 0.001 (about 110 m) until
    ``count_sql(size)`` counts at most ``limit`` cells."""
    size = 0.001
    while (con.execute(count_sql(size), params).fetchone() or (0,))[0] > limit:
        size *= 2
    return size


def _point_cells(con: Any, view: str, region_id: str) -> list[dict[str, Any]]:
    """``view``'s points of the region counted on a longitude/latitude grid, in DuckDB.

    The cell edge doubles from 0.001 degrees (about 110 m) until there are at most
    ``MAX_POINTS`` cells; each cell is one feature at the mean position of its points,
    saying how many it holds (and how many are open, and their dates, for grievances).
    """
    import shapely

    where = "region = ? AND geometry IS NOT NULL AND NOT ST_IsEmpty(geometry)"

    def cell_of(size: float) -> str:
        return f"floor(ST_X(geometry) / {size})::BIGINT, floor(ST_Y(geometry) / {size})::BIGINT"

    size = _cell_size(
        lambda size: f"SELECT count(DISTINCT ({cell_of(size)})) FROM {view} WHERE {where}",
        con, [region_id], MAX_POINTS,
    )  # fmt: skip
    cell = cell_of(size)
    rows = con.execute(
        f"SELECT avg(ST_X(geometry)), avg(ST_Y(geometry)), count(*), "
        f"count(*) FILTER (WHERE coalesce(status, 'open') = 'open'), min(date), max(date), "
        f"sum(population) FROM {view} WHERE {where} GROUP BY {cell} ORDER BY 3 DESC, 1, 2",
        [region_id],
    ).fetchall()
    what = "grievances" if view == "grievances" else "settlements"
    out = []
    for i, (x, y, count, open_, first, last, population) in enumerate(rows):
        out.append({
            "feature_id": f"{view}-cell-{i + 1}",
            "name": f"{count:,} {what} in this {size:g} degree cell",
            "category": f"aggregated: {count:,} points",
            "status": f"{open_:,} open" if view == "grievances" else None,
            "date": f"{first} to {last}" if first is not None else None,
            "population": population,
            "holder": None, "area_ha": None, "concession_id": None,
            "points": int(count), "cell_deg": size, "open_count": int(open_),
            "geometry": shapely.Point(x, y),
        })  # fmt: skip
    return out


#: Change rows of one period beyond this many reach the maps as areas summed on a grid
#: (per first-seen period for mining, per kind for abandoned land) instead of one
#: polygon each: a region with a million sites still makes a page of a few MB.
MAX_POLYGONS = 5000
MINING_KINDS = ("new", "expanded", "stable")


def _change_cells(con: Any, region_id: str, period: str) -> list[dict[str, Any]]:
    """The period's change rows summed on a longitude/latitude grid, in DuckDB.

    The cell edge doubles from 0.001 degrees (about 110 m) until each group (mining by
    first-seen period, abandoned and re-vegetating land by kind) has at most
    ``MAX_POLYGONS`` cells in all. Each cell is a square saying how many areas and how
    many hectares it holds; mining first seen this period counts as ``new``.
    """
    import shapely

    where = "region = ? AND period = ? AND geometry IS NOT NULL AND NOT ST_IsEmpty(geometry)"
    group = (
        f"CASE WHEN kind IN {MINING_KINDS} THEN 'mining:' || coalesce(first_seen_period, period) "
        "ELSE kind END"
    )

    def cell_of(size: float) -> str:
        return f"floor(ST_X(ST_Centroid(geometry)) / {size})::BIGINT AS cx, floor(ST_Y(ST_Centroid(geometry)) / {size})::BIGINT AS cy"  # fmt: skip

    def count_sql(size: float) -> str:
        return f"SELECT count(*) FROM (SELECT DISTINCT {cell_of(size)}, {group} AS g FROM asm_change WHERE {where})"  # fmt: skip

    size = _cell_size(count_sql, con, [region_id, period], MAX_POLYGONS)
    cell = cell_of(size)
    rows = con.execute(
        f"SELECT cx, cy, {group} AS g, count(*), sum(area_ha), avg(mean_ndvi) FROM "
        f"(SELECT *, {cell} FROM asm_change WHERE {where}) GROUP BY ALL ORDER BY cx, cy, g",
        [region_id, period],
    ).fetchall()
    out = []
    for i, (cx, cy, g, count, area, ndvi) in enumerate(rows):
        first = g.split(":", 1)[1] if g.startswith("mining:") else None
        kind = ("new" if first == period else "stable") if first is not None else g
        out.append({
            "change_id": f"{region_id}-{period}-cell-{i + 1}", "kind": kind,
            "area_ha": float(area), "first_seen_period": first,
            "mean_ndvi": float(ndvi) if ndvi is not None else None,
            "areas": int(count), "cell_deg": size,
            "geometry": shapely.box(cx * size, cy * size, (cx + 1) * size, (cy + 1) * size),
        })  # fmt: skip
    return out


def gather(root: Path, region: Region) -> RegionData:
    """Read everything the reports need for ``region`` from the catalog under ``root``."""
    import shapely

    from pipelines.infra.layout import CATALOG_FILE, composite_path
    from pipelines.stages.catalog import open_catalog
    from pipelines.stages.risk import SEVERITY_ORDER

    db = root / CATALOG_FILE
    con = open_catalog(root)
    try:
        if not _has_view(con, "region_summary"):
            raise ReportError(
                f"{db} has no region_summary view: materialise asm_change for region "
                f"{region.id!r} first"
            )
        summary = _rows(
            con, "SELECT * FROM region_summary WHERE region = ? ORDER BY period_start", [region.id]
        )
        known = {p.id for p in region.periods}
        summary = [s for s in summary if s["period"] in known]
        if not summary:
            raise ReportError(
                f"region {region.id!r} has no change summary yet: materialise asm_change "
                f"for its periods ({', '.join(p.id for p in region.periods)}) first"
            )
        periods = [s["period"] for s in summary]

        def geo_rows(view: str, where: str, params: list[Any], order: str = "") -> list[dict[str, Any]]:  # fmt: skip
            if not _has_view(con, view):
                return []
            rows = _rows(
                con,
                f"SELECT * EXCLUDE (geometry, bbox), ST_AsWKB(geometry) AS wkb FROM {view} "
                f"WHERE {where} {order}",
                params,
            )
            for r in rows:
                r["geometry"] = shapely.from_wkb(bytes(r.pop("wkb")))
            return rows

        def rows(view: str, order: str) -> dict[str, list[dict[str, Any]]]:
            if not _has_view(con, view):
                return {p: [] for p in periods}
            return {
                p: _rows(
                    con,
                    f"SELECT * FROM {view} WHERE region = ? AND period = ? {order}",
                    [region.id, p],
                )
                for p in periods
            }

        def change_rows(p: str) -> list[dict[str, Any]]:
            if _has_view(con, "asm_change"):
                sql = "SELECT count(*) FROM asm_change WHERE region = ? AND period = ?"
                n = (con.execute(sql, [region.id, p]).fetchone() or (0,))[0]
                if n > MAX_POLYGONS:
                    return _change_cells(con, region.id, p)
            return geo_rows(
                "asm_change", "region = ? AND period = ?", [region.id, p], "ORDER BY change_id"
            )

        change = {p: change_rows(p) for p in periods}
        context = {
            layer: (
                _point_cells(con, layer, region.id)
                if layer in POINT_LAYERS and _count(con, layer, region.id) > MAX_POINTS
                else geo_rows(layer, "region = ?", [region.id], "ORDER BY feature_id")
            )
            for layer in (*CONTEXT_STYLES, *WEB_ONLY_STYLES)
        }
        alerts = {  # the listed ones (the first max_alerts, by rank); the rest counted
            p: geo_rows(
                "alerts", "region = ? AND period = ? AND listed", [region.id, p], "ORDER BY rank"
            )
            for p in periods
        }
        alert_counts: dict[str, dict[str, tuple[int, float]]] = {p: {} for p in periods}
        if _has_view(con, "alerts"):
            sql = (
                f"SELECT period, severity, count(*), sum(area_ha) FROM alerts WHERE region = ? "
                f"GROUP BY ALL ORDER BY period, min({SEVERITY_ORDER})"
            )
            for period, severity, n, ha in con.execute(sql, [region.id]).fetchall():
                if period in alert_counts:
                    alert_counts[period][severity] = (int(n), float(ha or 0.0))
        relations: dict[str, list[dict[str, Any]]] = {}
        if _has_view(con, "alert_features") and _has_view(con, "alerts"):
            sql = (
                "SELECT f.alert_id, f.kind, f.relation, f.severity, f.feature_layer, "
                "f.feature_id, f.distance_m, f.overlap_ha FROM alert_features f JOIN alerts a "
                "USING (alert_id) WHERE a.region = ? AND a.listed ORDER BY f.alert_id, "
                f"{SEVERITY_ORDER.replace('severity', 'f.severity')}, f.distance_m, "
                "f.feature_layer, f.feature_id"
            )
            for r in _rows(con, sql, [region.id]):
                relations.setdefault(r["alert_id"], []).append(r)
        risk = rows("concession_risk", "ORDER BY score DESC, concession_id")
        pressure = rows("protected_area_pressure", "ORDER BY asm_area_ha DESC, area_id")
    finally:
        con.close()
    backdrops = {
        p: composite_path(root, region.id, p)
        for p in periods
        if composite_path(root, region.id, p).exists()
    }
    return RegionData(
        region, periods, summary, change, context, risk, pressure, alerts, backdrops,
        alert_counts, relations,
    )  # fmt: skip


# ---------------------------------------------------------------- backdrop (true colour)


def true_colour(cog: Path, max_px: int = BACKDROP_PX, dst_crs: str | None = None) -> tuple[np.ndarray, tuple[float, float, float, float], str]:  # fmt: skip
    """An RGBA uint8 image of a composite (B04, B03, B02), read from its overviews.

    Returns (image, (left, bottom, right, top), crs). With ``dst_crs`` the image is
    warped there (EPSG:3857 for the web map, whose image overlays are linear in it).
    No-data pixels are transparent.
    """
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.warp import calculate_default_transform, reproject

    with rasterio.open(cog) as src:
        names = list(src.descriptions)
        try:
            idx = [names.index(b) + 1 for b in ("B04", "B03", "B02")]
        except ValueError as e:
            raise ReportError(f"{cog}: not an asmwatch composite (bands {names})") from e
        scale = max(1.0, max(src.width, src.height) / max_px)
        shape = (max(1, round(src.height / scale)), max(1, round(src.width / scale)))
        rgb = src.read(idx, out_shape=(3, *shape), resampling=Resampling.average).astype("float32")
        transform = src.transform * src.transform.scale(src.width / shape[1], src.height / shape[0])
        crs = src.crs
        bounds = rasterio.transform.array_bounds(shape[0], shape[1], transform)
        if dst_crs is not None:
            dst_t, w, h = calculate_default_transform(crs, dst_crs, shape[1], shape[0], *bounds)
            out = np.full((3, h, w), np.nan, dtype="float32")
            reproject(
                rgb, out, src_transform=transform, src_crs=crs, dst_transform=dst_t,
                dst_crs=dst_crs, resampling=Resampling.bilinear, src_nodata=np.nan,
                dst_nodata=np.nan,
            )  # fmt: skip
            rgb, crs = out, dst_crs
            bounds = rasterio.transform.array_bounds(h, w, dst_t)
    valid = np.isfinite(rgb).all(axis=0)
    # A fixed stretch (reflectance 0-0.25, gamma 1/1.6) keeps periods comparable.
    img = np.clip(np.nan_to_num(rgb) / 0.25, 0, 1) ** (1 / 1.6)
    rgba = np.dstack([(img * 255).astype("uint8").transpose(1, 2, 0), np.where(valid, 255, 0).astype("uint8")])  # fmt: skip
    left, bottom, right, top = bounds
    return rgba, (left, bottom, right, top), str(crs)


def composite_preview(cog: Path, max_px: int = 320) -> bytes:
    """A small true-colour PNG of a composite, for the Dagster UI."""
    return _png(true_colour(cog, max_px=max_px)[0])


def probability_preview(cog: Path, max_px: int = 320) -> bytes:
    """A small PNG of a probability raster (magma, 0 dark to 1 bright; no-data transparent)."""
    import rasterio
    from matplotlib import colormaps
    from rasterio.enums import Resampling

    with rasterio.open(cog) as src:
        scale = max(1.0, max(src.width, src.height) / max_px)
        shape = (max(1, round(src.height / scale)), max(1, round(src.width / scale)))
        p = src.read(1, out_shape=shape, resampling=Resampling.average).astype("float32")
    rgba = (colormaps["magma"](np.clip(np.nan_to_num(p), 0, 1)) * 255).astype("uint8")
    rgba[..., 3] = np.where(np.isfinite(p), 255, 0)
    return _png(rgba)


def _png(rgba: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


# ---------------------------------------------------------------- expansion map (PNG)


def first_seen_areas(data: RegionData) -> dict[str, list[Any]]:
    """period -> geometries of mining first seen in that period, still or once mined.

    The mining of each period split by ``first_seen_period``: what a colour-per-year map
    shows. Areas mined and later abandoned keep the colour of the period they appeared.
    """
    out: dict[str, list[Any]] = {p: [] for p in data.periods}
    seen: set[str] = set()
    for p in data.periods:
        for r in data.change[p]:
            if r["kind"] in ("new", "expanded") and r["change_id"] not in seen:
                seen.add(r["change_id"])
                out.setdefault(r["first_seen_period"] or p, []).append(r["geometry"])
    return {p: out.get(p, []) for p in data.periods}


def expansion_map(data: RegionData, target: Path, lang: Lang = EN) -> Path:
    """Write the colour-per-period expansion map of ``data`` to ``target`` (PNG)."""
    import geopandas as gpd
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from pipelines.infra.grid import bbox_utm_epsg

    region = data.region
    crs = f"EPSG:{bbox_utm_epsg(region.bbox)}"
    fig, ax = plt.subplots(figsize=(9, 8), dpi=120)
    extent = None
    if data.backdrops:
        rgba, (left, bottom, right, top), img_crs = true_colour(data.backdrops[data.latest])
        crs = img_crs
        ax.imshow(rgba, extent=(left, right, bottom, top), interpolation="bilinear")
        extent = (left, right, bottom, top)
    else:
        ax.set_facecolor("#f2efe9")
    colours = period_colours(len(data.periods))
    handles = []
    areas = first_seen_areas(data)
    for p, colour in zip(data.periods, colours, strict=True):
        geoms = areas[p]
        if geoms:
            frame = gpd.GeoSeries(geoms, crs="EPSG:4326").to_crs(crs)
            frame.plot(ax=ax, color=colour, edgecolor=colour, linewidth=0.3)
            ha = float(frame.area.sum() / 1e4)
        else:
            ha = 0.0
        label = lang._("ASM first seen %(period)s: %(ha)s ha", period=p, ha=lang.num(ha))
        handles.append(Patch(facecolor=colour, label=label))
    words = labels(lang)["layers"]
    for layer, colour in CONTEXT_STYLES.items():
        label = words[layer]
        rows = data.context.get(layer) or []
        if rows:
            gpd.GeoSeries([r["geometry"] for r in rows], crs="EPSG:4326").to_crs(crs).boundary.plot(
                ax=ax, color=colour, linewidth=1.2, linestyle="--" if layer == "indigenous_lands" else "-"
            )  # fmt: skip
            handles.append(Patch(facecolor="none", edgecolor=colour, label=f"{label} ({len(rows)})"))  # fmt: skip
    if extent is not None:
        ax.set_xlim(extent[0], extent[1])
        ax.set_ylim(extent[2], extent[3])
    summary = data.summary
    growth = summary[-1]["growth_vs_first"] if len(summary) > 1 else None
    if growth is not None:
        title = lang._("ASM expansion %(first)s to %(last)s: mining area \u00d7%(growth)s", first=data.periods[0], last=data.latest, growth=lang.num(growth, 2))  # fmt: skip
    else:
        title = lang._("ASM expansion %(first)s to %(last)s", first=data.periods[0], last=data.latest)  # fmt: skip
    # Names are text, never TeX: "$5 a gram" or "$x^2$" must not be set as maths (a
    # malformed formula would crash the map). Period ids are plain by the regions file.
    ax.set_title(f"{region.name}\n{title}", fontsize=11, parse_math=False)
    ax.set_xlabel(lang._("easting (m, %(crs)s)", crs=crs), fontsize=8)
    ax.set_ylabel(lang._("northing (m)"), fontsize=8)
    ax.tick_params(labelsize=7)
    ax.ticklabel_format(style="plain", useOffset=False)
    ax.legend(handles=handles, loc="lower left", fontsize=7, framealpha=0.85)
    credit = lang._("asmwatch. Backdrop: median Sentinel-2 L2A composite of %(period)s (contains modified Copernicus Sentinel data).", period=data.latest if data.backdrops else "-")  # fmt: skip
    fig.text(0.01, 0.005, credit, fontsize=6, color="#555555", parse_math=False)
    fig.tight_layout()
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return target


# ---------------------------------------------------------------- region report (HTML)


def report_language(region: Region, language: str | None = None) -> Lang:
    """The language the region's outputs are written in: ``language`` when given (a
    command's override), else the region's (``Region.language``)."""
    return Lang(language or region.language)


@functools.cache
def labels(lang: Lang) -> dict[str, dict[str, str]]:
    """The words for the tables' coded values (bands, severities, kinds, layers); one
    dictionary per language, shared: not to be changed."""
    _ = lang._
    levels = {"critical": _("critical"), "high": _("high"), "medium": _("medium"), "low": _("low")}
    return {
        "band": levels,
        "severity": levels,
        "component": {
            "inside": _("ASM inside"), "proximity": _("ASM nearby"), "new": _("new ASM"),
            "growth": _("growth"), "people": _("people nearby"), "grievances": _("open grievances"),
        },
        "area_kind": {"protected": _("protected area"), "indigenous": _("indigenous land")},
        "layer": {  # one feature of a layer, as a relation names it
            "protected_areas": _("protected area"), "indigenous_lands": _("indigenous land"),
            "concessions": _("LSM concession"),
        },
        "layers": {
            "protected_areas": _("Protected areas"), "indigenous_lands": _("Indigenous lands"),
            "concessions": _("Large-scale mining (LSM) concessions"), "rivers": _("Rivers"),
            "settlements": _("Settlements"), "grievances": _("Grievances"),
        },
        "change": {
            "new": _("new mining"), "expanded": _("expanded mining"), "stable": _("stable mining"),
            "abandoned": _("abandoned"), "revegetating": _("re-vegetating"),
        },
        "cloud_mask": {
            "scl": _("Sen2Cor scene classes"),
            "scl+s2cloudless": _("Sen2Cor scene classes and s2cloudless"),
        },
    }  # fmt: skip


def templates(lang: Lang = EN) -> Any:
    """The one template engine of the reports: Jinja2 over pipelines/templates, HTML
    escaped by default, an undefined name an error, the messages of ``lang`` (``_``,
    ``ngettext``), and its formats: ``n`` (numbers), ``pct`` (shares)."""
    import jinja2

    from pipelines.i18n import translations

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).resolve().parents[1] / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        extensions=["jinja2.ext.i18n"],
    )
    env.install_gettext_translations(translations(lang.code), newstyle=True)  # type: ignore[attr-defined]
    env.filters["n"] = lang.num
    env.filters["pct"] = lang.percent
    return env


def plain_summary(data: RegionData, most: int = 3, lang: Lang = EN) -> list[str]:
    """What happened, in sentences a reader outside the team can take away: the latest
    period's mining against the previous and the first, what was new, what was left or
    re-vegetating, the protected areas, indigenous lands and concessions most affected,
    and the alerts. Every figure comes from the tables the report shows."""
    _, n = lang._, lang.num
    s = data.summary
    last, first = s[-1], s[0]
    name, p = data.region.name, last["period"]
    out = [_("In %(period)s, %(ha)s ha of artisanal and small-scale mining (ASM) were mapped in %(region)s.", period=p, ha=n(float(last["mining_ha"])), region=name)]  # fmt: skip
    compare = []
    if last.get("previous_period") and last.get("growth_vs_previous") is not None:
        prev_ha = float(last["previous_mining_ha"])
        delta = float(last["mining_ha"]) - prev_ha
        than = _("%(ha)s ha more than in %(period)s (%(before)s ha)") if delta > 0 else _("%(ha)s ha less than in %(period)s (%(before)s ha)")  # fmt: skip
        compare.append(than % {"ha": n(abs(delta)), "period": last["previous_period"], "before": n(prev_ha)})  # fmt: skip
    if first["period"] != p and last.get("growth_vs_first") is not None:
        compare.append(_("%(times)s times the area of %(period)s (%(ha)s ha)", times=n(float(last["growth_vs_first"]), 2), period=first["period"], ha=n(float(first["mining_ha"]))))  # fmt: skip
    if len(compare) == 2:
        out.append(_("That is %(one)s and %(two)s.", one=compare[0], two=compare[1]))
    elif compare:
        out.append(_("That is %(one)s.", one=compare[0]))
    if last.get("previous_period"):
        gone = float(last["abandoned_ha"]) + float(last["revegetating_ha"])
        values = {"new": n(float(last["new_ha"])), "expanded": n(float(last["expanded_ha"])), "gone": n(gone), "reveg": n(float(last["revegetating_ha"]))}  # fmt: skip
        if gone > 0:
            out.append(_("%(new)s ha were new mining sites and %(expanded)s ha expansions of existing ones; %(gone)s ha mined before were no longer mined, %(reveg)s ha of it re-vegetating.", **values))  # fmt: skip
        else:
            out.append(_("%(new)s ha were new mining sites and %(expanded)s ha expansions of existing ones; no land mined before was left.", **values))  # fmt: skip
    else:
        out.append(_("%(period)s is the first period: the baseline that later periods are compared with.", period=p))  # fmt: skip
    touched = sorted(
        (r for r in data.pressure.get(p, []) if (r.get("asm_area_ha") or 0) > 0),
        key=lambda r: -float(r["asm_area_ha"]),
    )[:most]
    words = labels(lang)
    if touched:
        items = [
            _("%(name)s (%(kind)s, %(ha)s ha inside)", name=r.get("name") or r["area_id"],
              kind=words["area_kind"].get(str(r.get("kind")), str(r.get("kind"))),
              ha=n(float(r["asm_area_ha"])))
            for r in touched
        ]  # fmt: skip
        out.append(_("Most affected protected areas and indigenous lands: %(items)s.", items="; ".join(items)))  # fmt: skip
    risky = [r for r in data.risk.get(p, []) if r.get("band") in ("critical", "high")][:most]
    if risky:
        items = [_("%(name)s (%(band)s, score %(score)s of 100)", name=r.get("name") or r["concession_id"], band=words["band"][r["band"]], score=n(float(r["score"]))) for r in risky]  # fmt: skip
        out.append(_("Large-scale mining (LSM) concessions most at risk of conflict with ASM: %(items)s.", items="; ".join(items)))  # fmt: skip
    total = data.alert_total(p)
    if total:
        by = data.alert_counts.get(p, {})
        parts = ", ".join(_("%(label)s: %(count)s", label=words["severity"][k], count=n(by[k][0], 0)) for k in ("critical", "high", "medium") if k in by)  # fmt: skip
        out.append(lang.ngettext("%(num)s alert was raised (%(parts)s); it is listed below and needs checking on the ground.", "%(num)s alerts were raised (%(parts)s); they are listed below and need checking on the ground.", total, parts=parts))  # fmt: skip
    elif last.get("previous_period"):
        out.append(_("No alerts were raised."))
    return out


def alert_text(lang: Lang, alert: dict[str, Any], relations: list[dict[str, Any]], names: dict[tuple[str, str], str]) -> str:  # fmt: skip
    """What an alert is and what it touches, in words: ``New mining: inside Parque X
    (protected area, 1.20 ha); 350 m from LSM concession Y``. ``names``: (layer,
    feature_id) -> the feature's name."""
    words = labels(lang)
    said = []
    for r in relations:
        layer, fid = r["feature_layer"], r["feature_id"]
        what = {"name": names.get((layer, fid)) or fid, "layer": words["layer"].get(layer, layer)}
        if r["relation"] == "inside":
            said.append(lang._("inside %(name)s (%(layer)s, %(ha)s ha)", ha=lang.num(r["overlap_ha"], 2), **what))  # fmt: skip
        else:
            said.append(lang._("%(m)s m from %(layer)s %(name)s", m=lang.num(r["distance_m"], 0), **what))  # fmt: skip
    kind = words["change"].get(alert["change_kind"], alert["change_kind"])
    return lang._("%(kind)s: %(where)s", kind=kind[:1].upper() + kind[1:], where="; ".join(said) or "-")  # fmt: skip


def alert_intro(lang: Lang, data: RegionData, period: str) -> str:
    """The sentence above the alerts table: how many, by severity, what an alert is,
    and how many more the table has than the report lists."""
    words = labels(lang)
    by = data.alert_counts.get(period, {})
    total = data.alert_total(period)
    parts = ", ".join(
        lang._("%(label)s: %(count)s", label=words["severity"][sev], count=lang.num(c[0], 0))
        for sev, c in by.items()
    )
    text = lang.ngettext(
        "%(num)s alert (%(parts)s): one per new or expanded mining area inside a protected area or indigenous land, or inside or near a large-scale mining (LSM) concession, most severe and largest first.",
        "%(num)s alerts (%(parts)s): one per new or expanded mining area inside a protected area or indigenous land, or inside or near a large-scale mining (LSM) concession, most severe and largest first.",
        total, parts=parts,
    )  # fmt: skip
    rest, ha = data.alert_rest(period)
    if rest > 0:
        listed = len(data.alerts.get(period, []))
        text += " " + lang.ngettext(
            "The %(listed)s listed here are on the map; %(num)s more (%(ha)s ha) is in the alerts table.",
            "The %(listed)s listed here are on the map; %(num)s more (%(ha)s ha) are in the alerts table.",
            rest, listed=lang.num(listed, 0), ha=lang.num(ha),
        )  # fmt: skip
    return text


def note_text(lang: Lang, note: str) -> str:
    """A note of the change summary (``pipelines.stages.change``) in the report's words."""
    import re

    from pipelines.stages.change import (
        NOTE_FIRST_PERIOD,
        NOTE_MMU_DIFFERS,
        NOTE_NO_COMPOSITE,
        NOTE_NO_HISTORY,
    )

    if note == NOTE_FIRST_PERIOD:
        return lang._("first period of the region: all its mining is new (the baseline)")
    if note == NOTE_NO_COMPOSITE:
        return lang._("no composite for this period: re-vegetation not assessed")
    m = re.fullmatch(re.escape(NOTE_NO_HISTORY).replace(re.escape("{period}"), "(.+?)"), note)
    if m:
        return lang._("no change table for %(period)s: the first-seen period of older mining is a bound (that period), and land abandoned before it is not tracked", period=m.group(1))  # fmt: skip
    pattern = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>.+?)", re.escape(NOTE_MMU_DIFFERS))
    if m := re.fullmatch(pattern, note):
        ha = {k: _threshold_num(lang, float(m[k])) for k in ("previous", "current", "used")}
        return lang._("the sites of %(previous_period)s were mapped with a minimum mapping unit of %(previous)s ha and this period's with %(current)s ha: former mining is counted from %(used)s ha, and sites between the two units can appear or vanish without changing", previous_period=m["previous_period"], **ha)  # fmt: skip
    log.warning("report: a change note with no translation is shown as written: %s", note)
    return note


@dataclass(frozen=True)
class Imagery:
    """What a period's composite rests on, for the methods section."""

    period: str
    scenes: int  # scenes the composite used
    first: str | None  # the first and last acquisition dates of those scenes
    last: str | None
    clear_share: float | None  # share of the region with a cloud-free observation (about)
    cloud_mask: str


def imagery_facts(root: Path, data: RegionData) -> list[Imagery]:
    """Per period: the scenes the composite used (its tags), their dates (the scenes
    table) and the share of the region with at least one cloud-free observation (the
    composite's ``clear_count`` band, read from an overview: about, to a percent)."""
    import rasterio
    from rasterio.enums import Resampling

    from pipelines.infra.layout import scenes_path
    from pipelines.stages.composite import COUNT_BAND, OUTPUT_BANDS

    if root in data.imagery_cache:
        return list(data.imagery_cache[root])
    out = []
    for p in data.periods:
        comp = data.backdrops.get(p)
        if comp is None:
            continue
        with rasterio.open(comp) as src:
            tags = src.tags()
            ids = [i for i in tags.get("asmwatch_scenes", "").split(",") if i]
            band = OUTPUT_BANDS.index(COUNT_BAND) + 1
            scale = max(1, max(src.height, src.width) // 1000)
            shape = (max(1, src.height // scale), max(1, src.width // scale))
            counts = src.read(band, out_shape=shape, resampling=Resampling.nearest)
        inside = np.isfinite(counts)
        share = float((counts[inside] > 0).mean()) if inside.any() else None
        dates: list[str] = []
        table = scenes_path(root, data.region.id, p)
        if table.exists() and ids:
            import pyarrow.parquet as pq

            t = pq.read_table(table, columns=["id", "datetime"]).to_pylist()
            dates = sorted(str(r["datetime"])[:10] for r in t if r["id"] in set(ids))
        out.append(
            Imagery(p, len(ids), dates[0] if dates else None, dates[-1] if dates else None,
                    share, tags.get("asmwatch_cloud_mask", "scl"))
        )  # fmt: skip
    data.imagery_cache[root] = list(out)
    return out


def imagery_dates(lang: Lang, i: Imagery) -> str:
    """A period's acquisition dates in words: ``3 Jun 2021 to 30 Sep 2021``."""
    if i.first is None or i.last is None:
        return "-"
    if i.first == i.last:
        return lang.date(i.first)
    return lang._("%(first)s to %(last)s", first=lang.date(i.first), last=lang.date(i.last))


def detector_text(root: Path, data: RegionData, lang: Lang = EN) -> str:
    """What mapped the mining, and how well it did on held-out data."""
    _ = lang._
    region = data.region
    if region.detections is not None:
        return _("Mining areas are imported detections from %(file)s, not mapped by asmwatch's model.", file=Path(region.detections.path).name)  # fmt: skip
    import json

    import rasterio

    from pipelines.infra.layout import probability_path

    used = set()
    domains: dict[str, dict[str, Any]] = {}
    screening: dict[str, dict[str, Any]] = {}
    for p in data.periods:
        prob = probability_path(root, region.id, p)
        if prob.exists():
            with rasterio.open(prob) as src:
                tags = src.tags()
            used.add(tags.get("asmwatch_detector", "unknown"))
            if "asmwatch_model_domain" in tags:
                domains[tags["asmwatch_detector"]] = json.loads(tags["asmwatch_model_domain"])
            if tags.get("asmwatch_screening") == "true":
                screening[tags["asmwatch_detector"]] = {
                    "block": int(tags["asmwatch_screening_block_px"]),
                    "members": tags.get("asmwatch_screening_members"),
                    "trees": tags.get("asmwatch_screening_trees"),
                    "heldout": json.loads(tags["asmwatch_model_heldout"]),
                    "px": abs(src.transform.a),
                }
    if not used:
        return _("The detector is not known: no probability maps were found for these periods.")
    if used == {"index-baseline"}:
        return _("Mining was mapped by a spectral index rule (no trained model): expect more confusion with bare soil and river sand than with a trained model.")  # fmt: skip
    from pipelines.stages.catalog import open_catalog

    texts = []
    con = open_catalog(root)
    try:
        for model in sorted(used - {"index-baseline"}):
            if model in screening:
                sc = screening[model]
                h = sc["heldout"]
                texts.append(_("a screening chip classifier (%(model)s; %(made)s) trained on %(domain)s: each %(block)s m square is flagged by the 48-pixel window around it, so the mapped areas are of flagged squares, an upper bound of the mined land, not its outline; on held-out regions it found %(sensitivity)s of mines at a specificity of %(specificity)s on ordinary landscape and %(hard)s on look-alikes (riverbanks, Acre)", model=model, made=screening_words(lang, sc["members"], sc["trees"]), domain=domain_words(lang, domains.get(model)), block=lang.num(sc["block"] * sc["px"], 0), sensitivity=lang.percent(h.get("sensitivity"), 1), specificity=lang.percent(h.get("specificity_random"), 1), hard=lang.percent(h.get("specificity_hard"), 1)))  # fmt: skip
                continue
            row = con.execute(
                "SELECT heldout_iou, baseline_heldout_iou FROM models WHERE model_id = ?", [model]
            ).fetchone() if _has_view(con, "models") else None  # fmt: skip
            if row is not None and row[0] is not None:
                texts.append(_("a U-Net segmentation model (%(model)s) trained on %(domain)s, whose agreement with mapped mining on a held-out period (intersection over union) is %(iou)s, against %(baseline)s for a spectral index rule", model=model, domain=domain_words(lang, domains.get(model)), iou=lang.num(float(row[0]), 2), baseline=lang.num(float(row[1]), 2)))  # fmt: skip
            else:
                texts.append(_("a segmentation model (%(model)s) with no held-out figures recorded", model=model))  # fmt: skip
    finally:
        con.close()
    if screening and used - {"index-baseline"} <= set(screening):
        return _("Possible mining was screened, not mapped, by %(detectors)s.", detectors="; ".join(texts))  # fmt: skip
    return _("Mining was mapped at 10 m by %(detectors)s.", detectors="; ".join(texts))


def screening_words(lang: Lang, members: str | None, trees: str | None) -> str:
    """What a screening chip classifier is made of, from its probability COG's
    ``asmwatch_screening_members`` and ``asmwatch_screening_trees`` tags (a map made
    before they were written says so rather than guess)."""
    n = int(members) if members is not None and members.isdigit() else 0
    if n < 1 or trees not in ("true", "false"):
        return lang._("its make-up not recorded with the map")
    if trees == "true":
        return lang.ngettext("one small convolutional network and gradient-boosted trees on the colour and texture of each window, their votes combined", "%(num)s small convolutional networks and gradient-boosted trees on the colour and texture of each window, their votes combined", n)  # fmt: skip
    return lang.ngettext("one small convolutional network", "the mean of %(num)s small convolutional networks", n)  # fmt: skip


def domain_words(lang: Lang, domain: dict[str, Any] | None) -> str:
    """What a model was trained on, for the methods section (its probability COG's
    ``asmwatch_model_domain`` tag)."""
    if not domain or domain.get("imagery") not in ("embedded", "real", "mixed"):
        return lang._("imagery that was not recorded (a model registered before asmwatch recorded it)")  # fmt: skip
    regions = ", ".join(domain.get("regions") or []) or "-"
    if domain["imagery"] == "embedded":
        return lang._("simulated scenes of %(regions)s (asmwatch's embedded world, not real imagery)", regions=regions)  # fmt: skip
    if domain["imagery"] == "real" and domain.get("screening"):
        return lang._("real Sentinel-2 RGB image chips of %(regions)s", regions=regions)
    if domain["imagery"] == "real":
        return lang._("real Sentinel-2 composites of %(regions)s", regions=regions)
    return lang._("simulated and real composites of %(regions)s", regions=regions)


def context_sources(region: Region, lang: Lang = EN) -> str:
    """The region's context layers and the files they came from, for the credits."""
    if not region.context:
        return lang._("none")
    words = labels(lang)["layers"]
    parts = []
    for kind, path in region.context.items():
        source = lang._("simulated (demo)") if path.startswith("embedded:") else Path(path).name
        parts.append(f"{words.get(kind, kind)}: {source}")
    return "; ".join(parts)


def _threshold_num(lang: Lang, v: float) -> str:
    """A threshold in the language's number format, with the decimals it has."""
    from pipelines import thresholds as th

    return lang.num(v, max(0, len(th.number(v).partition(".")[2])))


def threshold_texts(
    lang: Lang = EN, mmu_ha: float | None = None, alert_distance_m: float | None = None
) -> dict[str, str]:
    """The thresholds the report states (``pipelines.thresholds``), in the language's
    number format; ``mmu_ha`` and ``alert_distance_m``: the values the tables were made
    with, where a run set others (``recorded_units``, ``recorded_distances``)."""
    from pipelines import thresholds as th

    def num(v: float) -> str:
        return _threshold_num(lang, v)

    distance_m = th.ALERT_DISTANCE_M if alert_distance_m is None else alert_distance_m

    return {
        "mmu_ha": num(th.MMU_HA if mmu_ha is None else mmu_ha),
        "ndvi_recovered": num(th.NDVI_RECOVERED),
        "alert_distance_km": num(distance_m / 1000),
        "alert_high_within_m": num(th.ALERT_HIGH_WITHIN_M),
        "alert_critical_ha": num(th.ALERT_CRITICAL_HA),
        "alert_high_ha": num(th.ALERT_HIGH_HA),
        "band_critical": num(th.RISK_BAND_CRITICAL),
        "band_high": num(th.RISK_BAND_HIGH),
        "band_medium": num(th.RISK_BAND_MEDIUM),
    }


def recorded_units(root: Path, data: RegionData) -> dict[str, float]:
    """Period -> the minimum mapping unit (ha) its sites file records (``asm_sites``'s
    ``mmu_ha`` of that run); periods whose file records none are left out."""
    from pipelines.stages.sites import recorded_mmu

    units = {}
    for period in data.periods:
        path = sites_path(root, data.region.id, period)
        if path.exists() and (value := recorded_mmu(path)) is not None:
            units[period] = value
    return units


def recorded_distances(root: Path, data: RegionData) -> dict[str, float]:
    """Period -> the alert distance (m) its alerts file records (the risk assets'
    ``alert_distance_m`` of that run); periods whose file records none are left out."""
    from pipelines.stages.risk import recorded_settings

    out = {}
    for period in data.periods:
        path = risk_path(root, "alerts", data.region.id, period)
        if path.exists() and "alert_distance_m" in (got := recorded_settings(path)):
            out[period] = got["alert_distance_m"]
    return out


def distance_note(lang: Lang, distances: dict[str, float]) -> str:
    """A sentence naming each period's alert distance when they differ, else ''."""
    if len(set(distances.values())) < 2:
        return ""
    listed = ", ".join(f"{p}: {_threshold_num(lang, v / 1000)} km" for p, v in distances.items())  # fmt: skip
    return lang._("The distance from a concession within which new mining raises an alert was not the same in every period (%(distances)s).", distances=listed)  # fmt: skip


def unit_note(lang: Lang, units: dict[str, float]) -> str:
    """A sentence naming each period's minimum mapping unit when they differ, else ''."""
    if len(set(units.values())) < 2:
        return ""
    listed = ", ".join(f"{p}: {_threshold_num(lang, v)} ha" for p, v in units.items())
    return lang._("The minimum mapping unit was not the same in every period (%(units)s); the figures of periods mapped with a larger unit leave out the smaller sites.", units=listed)  # fmt: skip


def feature_names(data: RegionData) -> dict[tuple[str, str], str]:
    """(layer, feature_id) -> name, for the context features alerts name."""
    return {
        (layer, r["feature_id"]): r["name"]
        for layer, rows in data.context.items()
        for r in rows
        if r.get("name") and r.get("feature_id") is not None
    }


def region_report(
    data: RegionData,
    target: Path,
    png: bytes,
    webmap_name: str = "webmap.html",
    root: Path | None = None,
    lang: Lang = EN,
) -> Path:
    """Write the HTML region report (self-contained: the map is embedded). ``root``: the
    data root, for the methods section's imagery and detector (left out without it)."""
    from pipelines import thresholds as th

    env = templates(lang)
    latest = data.latest
    s = data.summary
    first, last = s[0], s[-1]
    words = labels(lang)
    names = feature_names(data)
    alerts = [
        {**a, "said": alert_text(lang, a, data.relations.get(a["alert_id"], []), names)}
        for a in data.alerts.get(latest, [])
    ]
    facts = imagery_facts(root, data) if root is not None else []
    imagery = [{**i.__dict__, "dates": imagery_dates(lang, i)} for i in facts]
    notes = [
        (r["period"], note_text(lang, note))
        for r in s
        for note in (r.get("notes") or "").split("; ")
        if note
    ]
    upto = {c: lang._("up to %(max)s", max=lang.num(th.RISK_COMPONENT_MAX[c], 0)) for c in COMPONENTS}  # fmt: skip
    # The unit the sites were mapped with (a run may set another than the default).
    units = recorded_units(root, data) if root is not None else {}
    distances = recorded_distances(root, data) if root is not None else {}
    text = env.get_template("report.html.j2").render(
        lang=lang,
        L=words,
        region=data.region,
        generated=lang.datetime(datetime.now(UTC)),
        t=threshold_texts(lang, units.get(latest), distances.get(latest)),
        unit_note=unit_note(lang, units),
        distance_note=distance_note(lang, distances),
        plain=plain_summary(data, lang=lang),
        imagery=imagery,
        detector=detector_text(root, data, lang) if root is not None else "",
        sources=context_sources(data.region, lang),
        summary=s,
        notes=notes,
        first=first,
        last=last,
        latest=latest,
        colours=dict(zip(data.periods, period_colours(len(data.periods)), strict=True)),
        risk=data.risk.get(latest, [])[:10],
        components=COMPONENTS,
        component_max={c: lang.num(th.RISK_COMPONENT_MAX[c], 0) for c in COMPONENTS},
        component_list=", ".join(f"{words['component'][c]} ({upto[c]})" for c in COMPONENTS),
        pressure=[r for r in data.pressure.get(latest, []) if r["site_count"] or r["asm_area_ha"]],
        pressure_all=len(data.pressure.get(latest, [])),
        alerts=alerts,
        alert_intro=alert_intro(lang, data, latest),
        alert_total=data.alert_total(latest),
        alert_counts={p: data.alert_total(p) for p in data.periods},
        map_uri=_data_uri(png),
        webmap=webmap_name,
    )
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return target


# ---------------------------------------------------------------- web map (Leaflet)


def leaflet_assets() -> tuple[str, str]:
    """Leaflet's JS and CSS from the pinned xstatic-leaflet package (never a CDN)."""
    try:
        import xstatic.pkg.leaflet as xl
    except ImportError as e:  # pragma: no cover - a pinned dependency
        raise ReportError("xstatic-leaflet is not installed; run `make setup`") from e
    import re

    base = Path(xl.BASE_DIR)
    css = (base / "leaflet.css").read_text(encoding="utf-8")

    def inline(m: re.Match[str]) -> str:  # the layer button's icon, inside the page
        return f"url({_data_uri((base / 'images' / m.group(1)).read_bytes())})"

    css = re.sub(r"url\(images/([\w.-]+\.png)\)", inline, css)
    return (base / "leaflet.js").read_text(encoding="utf-8"), css


def _feature(geom: Any, props: dict[str, Any]) -> dict[str, Any]:
    import shapely

    g = shapely.simplify(geom, WEB_SIMPLIFY_DEG, preserve_topology=True)
    clean = {}
    for k, v in props.items():
        if isinstance(v, float) and not np.isfinite(v):
            v = None
        elif isinstance(v, float):
            v = round(v, 3)
        elif v is not None and not isinstance(v, (int, str, bool, dict, list)):
            v = str(v)
        clean[k] = v
    return {"type": "Feature", "geometry": json.loads(shapely.to_geojson(shapely.set_precision(g, 1e-6))), "properties": clean}  # fmt: skip


CHANGE_PROPERTIES = ("change_id", "kind", "area_ha", "first_seen_period", "mean_ndvi")


def _change_features(rows: list[dict[str, Any]], kinds: tuple[str, ...]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        if r["kind"] in kinds:
            props = {k: r[k] for k in CHANGE_PROPERTIES}
            if "areas" in r:  # a grid cell standing for many areas (``MAX_POLYGONS``)
                props["areas"], props["cell_deg"] = r["areas"], r["cell_deg"]
            out.append(_feature(r["geometry"], props))
    return out


#: Alert colours by severity: the purple side of ColorBrewer's colour-blind-safe PuOr
#: scheme, whose orange side (#e66101) marks grievances; dark to light with severity,
#: every marker ringed in black so the palest stays visible on any backdrop.
ALERT_COLOURS = {"critical": "#2d004b", "high": "#8073ac", "medium": "#d8daeb"}
#: Former mining: (outline, fill) for abandoned and re-vegetating land.
FORMER_COLOURS = {"abandoned": ("#8c510a", "#dfc27d"), "revegetating": ("#4dac26", "#b8e186")}


def _popup(title: str, rows: list[tuple[str, str]]) -> dict[str, Any]:
    return {"title": title, "rows": [[k, v] for k, v in rows]}


def _mining_popup(lang: Lang, period: str, f: dict[str, Any]) -> dict[str, Any]:
    _, words = lang._, labels(lang)
    q = f["properties"]
    area = lang._("%(ha)s ha", ha=lang.num(q["area_ha"], 2))
    if q.get("areas"):  # a grid cell summing many areas (``MAX_POLYGONS``)
        title = lang.ngettext("%(num)s mining area in this cell", "%(num)s mining areas in this cell", q["areas"])  # fmt: skip
    else:
        kind = words["change"].get(q["kind"], q["kind"])
        title = kind[:1].upper() + kind[1:]
    return _popup(title, [(_("Period"), period), (_("First seen"), q["first_seen_period"] or "-"), (_("Area"), area)])  # fmt: skip


def _former_popup(lang: Lang, period: str, f: dict[str, Any]) -> dict[str, Any]:
    from pipelines import thresholds as th

    _, words = lang._, labels(lang)
    q = f["properties"]
    ndvi = _("%(value)s (re-vegetating from %(threshold)s)", value=lang.num(q["mean_ndvi"], 2), threshold=lang.num(th.NDVI_RECOVERED, 2))  # fmt: skip
    title = _("Former mining: %(kind)s", kind=words["change"].get(q["kind"], q["kind"]))
    return _popup(title, [
        (_("Period"), period), (_("First seen"), q["first_seen_period"] or "-"),
        (_("Vegetation index (NDVI)"), ndvi), (_("Area"), _("%(ha)s ha", ha=lang.num(q["area_ha"], 2))),
    ])  # fmt: skip


def _date_text(lang: Lang, value: Any) -> str:
    """A date from the data in the language's words; a range of a grid cell (``2019-05-13
    to 2021-02-01``) as a range; anything else as written."""
    import re

    text = "" if value is None else str(value)
    dates = re.findall(r"\d{4}-\d{2}-\d{2}", text)
    if len(dates) == 1 and text.strip()[:10] == dates[0]:
        return lang.date(dates[0])
    if len(dates) == 2:
        if dates[0] == dates[1]:
            return lang.date(dates[0])
        return lang._("%(first)s to %(last)s", first=lang.date(dates[0]), last=lang.date(dates[1]))
    return text or "-"


def _context_popup(lang: Lang, layer: str, p: dict[str, Any]) -> dict[str, Any]:
    _, words = lang._, labels(lang)
    if p.get("points"):  # a grid cell standing for many points (``MAX_POINTS``)
        deg = lang.num(p["cell_deg"], 3)
        if layer == "grievances":
            title = lang.ngettext("%(num)s grievance in this cell of %(deg)s°", "%(num)s grievances in this cell of %(deg)s°", p["points"], deg=deg)  # fmt: skip
            rows = [(_("Open"), lang.num(p.get("open_count"), 0)), (_("Dates"), _date_text(lang, p.get("date")))]  # fmt: skip
        else:
            title = lang.ngettext("%(num)s settlement in this cell of %(deg)s°", "%(num)s settlements in this cell of %(deg)s°", p["points"], deg=deg)  # fmt: skip
            rows = [(_("Population"), lang.num(p.get("population"), 0))]
        return _popup(title, [(_("Layer"), words["layers"].get(layer, layer)), *rows])
    rows = [(_("Layer"), words["layers"].get(layer, layer)), (_("Category"), p.get("category") or "-")]  # fmt: skip
    if p.get("area_ha") is not None:
        rows.append((_("Area"), _("%(ha)s ha", ha=lang.num(p["area_ha"]))))
    if p.get("population") is not None:
        rows.append((_("Population"), lang.num(p["population"], 0)))
    if layer == "grievances":
        status = {"open": _("open"), "closed": _("closed")}.get(str(p.get("status")), p.get("status") or "-")  # fmt: skip
        rows += [(_("Date"), _date_text(lang, p.get("date"))), (_("Status"), str(status))]
        if p.get("concession_id"):
            rows.append((_("Concession"), p["concession_id"]))
    if layer == "concessions":
        rows.append((_("Holder"), p.get("holder") or "-"))
    return _popup(str(p.get("name") or p.get("feature_id")), rows)


def _risk_rows(lang: Lang, period: str, r: dict[str, Any]) -> list[list[str]]:
    """A concession's risk in a period, in words, every part against its maximum."""
    from pipelines import thresholds as th

    words = labels(lang)
    rows = [[
        lang._("Risk of conflict with ASM, %(period)s", period=period),
        lang._("%(score)s of 100 (%(band)s)", score=lang.num(r["score"]), band=words["band"].get(r["band"], r["band"])),
    ]]  # fmt: skip
    for c in COMPONENTS:
        rows.append([
            "\u2003" + words["component"][c],
            lang._("%(score)s of %(max)s", score=lang.num(r[f"score_{c}"]), max=lang.num(th.RISK_COMPONENT_MAX[c], 0)),
        ])  # fmt: skip
    return rows


def legend(lang: Lang, data: RegionData, context: dict[str, Any]) -> list[dict[str, Any]]:
    """The web map's key: a section per kind of layer, a row per colour it draws."""
    _, words = lang._, labels(lang)
    sections = [{
        "title": _("Mining, by the period first seen"),
        "rows": [{"shape": "fill", "colour": c, "label": p} for p, c in zip(data.periods, period_colours(len(data.periods)), strict=True)],
    }, {
        "title": _("Former mining"),
        "rows": [{"shape": "fill", "colour": FORMER_COLOURS[k][1], "edge": FORMER_COLOURS[k][0], "label": words["change"][k]} for k in ("abandoned", "revegetating")],
    }, {
        "title": _("Alerts, by severity"),
        "rows": [{"shape": "ring", "colour": ALERT_COLOURS[k], "edge": "#000000", "label": words["severity"][k]} for k in ("critical", "high", "medium")],
    }]  # fmt: skip
    rows = []
    for layer, c in context.items():
        shape = {"indigenous_lands": "dash", "rivers": "line", "settlements": "dot", "grievances": "dot"}.get(layer, "outline")  # fmt: skip
        rows.append({"shape": shape, "colour": c["colour"], "edge": "#ffffff" if shape == "dot" else c["colour"], "label": words["layers"][layer]})  # fmt: skip
    if rows:
        sections.append({"title": _("Context"), "rows": rows})
    return sections


def web_strings(lang: Lang) -> dict[str, str]:
    """The web map's own words (its controls and layers); the data's are formatted
    by ``web_data``."""
    _ = lang._
    return {
        "period": _("Period"),
        "legend": _("Legend"),
        "composite": _("Sentinel-2 composite"),
        "mining": _("Mining (colour: period first seen)"),
        "former": _("Former mining"),
        "alerts": _("Alerts"),
        "map": _("Map of artisanal and small-scale mining"),
        "backdrop": _("Sentinel-2 composite of %(period)s"),
        "attribution": _("asmwatch; contains modified Copernicus Sentinel data"),
        "zoom_in": _("Zoom in"),
        "zoom_out": _("Zoom out"),
        "layers": _("Layers"),
        "close": _("Close"),
    }


def web_data(data: RegionData, root: Path | None = None, lang: Lang = EN) -> dict[str, Any]:
    """The JSON document the web map draws: layers per period and context layers, every
    word in ``lang`` and every number formatted for it (the page only shows them)."""
    colours = period_colours(len(data.periods))
    words = labels(lang)
    names = feature_names(data)
    facts = {i.period: i for i in (imagery_facts(root, data) if root is not None else [])}
    periods = []
    for p, colour in zip(data.periods, colours, strict=True):
        mining = _change_features(data.change[p], ("new", "expanded", "stable"))
        for f in mining:
            f["properties"]["popup"] = _mining_popup(lang, p, f)
        reveg = _change_features(data.change[p], ("abandoned", "revegetating"))
        for f in reveg:
            f["properties"]["popup"] = _former_popup(lang, p, f)
        alerts = []
        for r in data.alerts[p]:
            sev = words["severity"].get(r["severity"], r["severity"])
            popup = _popup(
                lang._("Alert %(ref)s: %(severity)s", ref=r["alert_ref"], severity=sev),
                [(lang._("Area"), lang._("%(ha)s ha", ha=lang.num(r["area_ha"], 2))),
                 (lang._("What and where"), alert_text(lang, r, data.relations.get(r["alert_id"], []), names))],
            )  # fmt: skip
            props = {k: r[k] for k in ("alert_ref", "severity", "change_kind", "area_ha")}
            alerts.append(_feature(r["geometry"].representative_point(), {**props, "popup": popup}))  # fmt: skip
        risk = {r["concession_id"]: _risk_rows(lang, p, r) for r in data.risk.get(p, [])}
        summary = next(s for s in data.summary if s["period"] == p)
        backdrop = None
        if p in data.backdrops:
            rgba, (left, bottom, right, top), _ = true_colour(data.backdrops[p], dst_crs="EPSG:3857")  # fmt: skip
            from pyproj import Transformer

            to_ll = Transformer.from_crs("EPSG:3857", "EPSG:4326", always_xy=True)
            (w, s_), (e, n) = to_ll.transform(left, bottom), to_ll.transform(right, top)
            backdrop = {"url": _data_uri(_png(rgba)), "bounds": [[s_, w], [n, e]]}
        total = data.alert_total(p)
        stats = lang._("%(ha)s ha of ASM", ha=lang.num(summary["mining_ha"]))
        if summary["growth_vs_previous"] is not None:
            stats += lang._(", \u00d7%(growth)s on the previous period", growth=lang.num(summary["growth_vs_previous"], 2))  # fmt: skip
        stats += "; " + lang.ngettext("%(num)s alert", "%(num)s alerts", total)
        if total > len(alerts):
            stats += " " + lang._("(the %(shown)s most severe shown)", shown=lang.num(len(alerts), 0))  # fmt: skip
        fact = facts.get(p)
        if fact is not None and fact.scenes:
            images = lang.ngettext("Images: %(num)s scene, %(dates)s", "Images: %(num)s scenes, %(dates)s", fact.scenes, dates=imagery_dates(lang, fact))  # fmt: skip
            if fact.clear_share is not None:
                images += "; " + lang._("about %(share)s cloud-free", share=lang.percent(fact.clear_share))  # fmt: skip
        else:
            images = lang._("Images: no composite for this period")
        periods.append(
            {
                "id": p,
                "colour": colour,
                "mining_ha": summary["mining_ha"],
                "growth_vs_previous": summary["growth_vs_previous"],
                "stats": stats,
                "images": images,
                "mining": {"type": "FeatureCollection", "features": mining},
                "revegetating": {"type": "FeatureCollection", "features": reveg},
                "alerts": {"type": "FeatureCollection", "features": alerts},
                "alert_count": total,
                "risk": risk,
                "backdrop": backdrop,
            }
        )
    context = {}
    for layer, colour in {**CONTEXT_STYLES, **WEB_ONLY_STYLES}.items():
        rows = data.context.get(layer, [])
        if not rows and layer in WEB_ONLY_STYLES:
            continue  # optional layers the region does not have
        keys = ("feature_id", "name", "category", "holder", "status", "area_ha", "population", "date", "concession_id")  # fmt: skip
        feats = [_feature(r["geometry"], {k: r.get(k) for k in keys}) for r in rows]
        cells = bool(rows) and "points" in rows[0]
        for f, r in zip(feats, rows, strict=True):
            if cells:
                f["properties"]["points"] = r["points"]
                f["properties"]["cell_deg"] = r["cell_deg"]
                f["properties"]["open_count"] = r.get("open_count")
            f["properties"]["popup"] = _context_popup(lang, layer, f["properties"])
        points = sum(r["points"] for r in rows) if cells else len(feats)
        count = (
            lang.ngettext("%(num)s in %(cells)s cell of %(deg)s\u00b0", "%(num)s in %(cells)s cells of %(deg)s\u00b0", points, cells=lang.num(len(feats), 0), deg=lang.num(rows[0]["cell_deg"], 3))
            if cells else lang.num(len(feats), 0)
        )  # fmt: skip
        context[layer] = {
            "label": f"{words['layers'][layer]} ({count})", "colour": colour,
            "data": {"type": "FeatureCollection", "features": feats},
            # Aggregated point layers: how many points, on cells of what size.
            "points": points, "cell_deg": rows[0]["cell_deg"] if cells else None,
        }  # fmt: skip
    w, s_, e, n = data.region.bbox
    return {
        "lang": lang.code,
        "t": web_strings(lang),
        "region": {"id": data.region.id, "name": data.region.name, "bbox": [[s_, w], [n, e]]},
        "periods": periods,
        "context": context,
        "legend": legend(lang, data, context),
        "styles": {
            "alerts": ALERT_COLOURS,
            "former": {k: {"edge": e, "fill": f} for k, (e, f) in FORMER_COLOURS.items()},
        },
        "generated": lang._("Map made %(date)s by asmwatch", date=lang.datetime(datetime.now(UTC))),
    }


def web_map(data: RegionData, target: Path, root: Path | None = None, lang: Lang = EN) -> Path:
    """Write the offline interactive map (one HTML file, Leaflet inlined). ``root``: the
    data root, for the periods' image dates."""
    js, css = leaflet_assets()
    doc = json.dumps(web_data(data, root, lang), separators=(",", ":"), allow_nan=False)
    # JSON inside <script> must not close the element: escape '<' (and so '</script>').
    doc = doc.replace("<", "\\u003c")
    from markupsafe import Markup

    # The title is escaped by the template; Leaflet's files and the data are made safe
    # for their <style>/<script> elements here, and inserted as they are.
    page = (
        templates(lang)
        .get_template("webmap.html")
        .render(
            LANG=lang.code,
            TITLE=lang._(
                "%(region)s: map of artisanal and small-scale mining", region=data.region.name
            ),
            LEAFLET_CSS=Markup(css),
            LEAFLET_JS=Markup(js.replace("</script", "<\\/script")),
            DATA=Markup(doc),
        )
    )
    with atomic_path(target) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return target


# ---------------------------------------------------------------- all three


@dataclass
class Reports:
    directory: Path
    expansion_png: Path
    report_html: Path
    webmap_html: Path
    data: RegionData
    thumbnail: bytes  # a small PNG of the expansion map, for the Dagster UI
    language: str = "en"


def thumbnail(png_path: Path, width: int = 320) -> bytes:
    """A small palette PNG of ``png_path`` (tens of kB), for a Markdown preview in the UI."""
    from PIL import Image

    with Image.open(png_path) as im:
        small = im.convert("RGB")
        small.thumbnail((width, width))
        buf = io.BytesIO()
        small.quantize(colors=96).save(buf, format="PNG", optimize=True)
        return buf.getvalue()


def markdown_image(png: bytes, alt: str) -> str:
    """A Markdown image with the PNG inline, as the Dagster UI renders asset metadata."""
    return f"![{alt}]({_data_uri(png)})"


def make_reports(
    root: Path,
    region: Region,
    say: Callable[[str], None] = log.info,
    language: str | None = None,
    out: Path | None = None,
) -> Reports:
    """Gather the region's tables and write the map, the report and the web map, in
    ``language`` (default: the region's) to ``out`` (default: reports/<region>/)."""
    data = gather(root, region)
    lang = report_language(region, language)
    out = out or report_dir(root, region.id)
    why = "set for this run" if language else region.language_reason
    say(f"reports {region.id}: periods {', '.join(data.periods)}; language {lang.code} ({why}); writing to {out}")  # fmt: skip
    png = expansion_map(data, out / "expansion.png", lang)
    say(f"reports {region.id}: expansion map {png}")
    webmap = web_map(data, out / "webmap.html", root, lang)
    say(f"reports {region.id}: web map {webmap} ({webmap.stat().st_size / 1e6:.1f} MB)")
    report = region_report(data, out / "report.html", png.read_bytes(), root=root, lang=lang)
    say(f"reports {region.id}: region report {report}")
    for path in (png, webmap, report):  # reports are for sharing
        path.chmod(0o644)
    return Reports(out, png, report, webmap, data, thumbnail(png), lang.code)
