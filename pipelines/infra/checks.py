"""Data contracts of the published tables, checked on every write.

Each table asset reports four Dagster asset checks on the partition it wrote, computed
by DuckDB over the file itself (what an analyst will read), not over the frame in memory:

- ``schema``: every contract column is present with its type (extra columns are fine).
- ``non_empty``: the table has rows. Tables that may rightly be empty (no ASM in a
  period, no alerts) report an empty result as a warning, the others as an error.
- ``geometry_valid``: geometries are present, non-empty, valid (GEOS), of the allowed
  types, and within the region's bounding box (plus a margin).
- ``areas_plausible``: ``area_ha`` is finite and non-negative, its total fits in the
  AOI, and it matches the geometry's area in the region's UTM zone (1 % + 0.01 ha);
  risk scores lie in 0-100 and equal the sum of their components.

The contracts here are the data dictionary in code: docs/data-dictionary.md lists the
same columns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb

from pipelines.infra.grid import bbox_utm_epsg
from pipelines.regions import Region
from pipelines.stages.context import KEEP_WITHIN_DEG
from pipelines.thresholds import RISK_COMPONENT_MAX

POLYGONAL = ("POLYGON", "MULTIPOLYGON")
#: Geometries may reach this far (degrees) outside the region's bbox (scenes are whole
#: tiles). Context layers have their own rule: see ``Contract.keep_within_deg``.
BBOX_MARGIN_DEG = 0.11
AREA_RTOL = 0.01
AREA_ATOL_HA = 0.01
CHECKS = ("schema", "non_empty", "geometry_valid", "areas_plausible")

V, D, B, I_, G = "VARCHAR", "DOUBLE", "BIGINT", "INTEGER", "GEOMETRY"
TSZ = "TIMESTAMP WITH TIME ZONE"
#: Alerts and their relations: a severity is one of the three the report explains.
KNOWN_SEVERITY = "severity NOT IN ('critical', 'high', 'medium')"
_SCORES = tuple(f"score_{k}" for k in RISK_COMPONENT_MAX)


@dataclass(frozen=True)
class Contract:
    """What a table promises: columns and types, geometry kinds, area rules."""

    table: str
    columns: dict[str, str]
    geometry: tuple[str, ...] = ()  # allowed geometry types; empty: no geometry column
    may_be_empty: bool = True
    area_column: str | None = None  # checked against the geometry's UTM area when set
    area_matches_geometry: bool = True
    bbox_margin_deg: float = BBOX_MARGIN_DEG
    # Features kept whole when they touch the region's bbox widened by this much (the
    # context layers' keep rule, pipelines.stages.context.KEEP_WITHIN_DEG): the check then asks
    # that each geometry intersect that box, not that it lie inside it.
    keep_within_deg: float | None = None
    id_column: str | None = None  # what the checks' examples name (default: the first column)
    score_components: tuple[str, ...] = ()  # score = their sum, each and the sum in 0-100
    area_nullable: bool = False  # point and line layers have no area
    extra: dict[str, str] = field(default_factory=dict)  # check name -> SQL count of bad rows


_CONTEXT_COLUMNS = {
    "region": V, "layer": V, "feature_id": V, "name": V, "category": V, "area_ha": D,
    "holder": V, "status": V, "population": D, "date": "DATE", "place": V,
    "concession_id": V, "attributes": V, "source_file": V, "geometry": G,
}  # fmt: skip

CONTRACTS: dict[str, Contract] = {
    "scenes": Contract(
        "scenes",
        {
            "region": V,
            "period": V,
            "id": V,
            "collection": V,
            "datetime": TSZ,
            "mgrs_tile": V,
            "cloud_cover": D,
            "epsg": B,
            "geometry": G,
        },
        geometry=POLYGONAL,
        may_be_empty=True,
        bbox_margin_deg=1.5,
        extra={"cloud_cover_in_0_100": "cloud_cover < 0 OR cloud_cover > 100"},
    ),
    "asm_sites": Contract(
        "asm_sites",
        {
            "site_id": V,
            "region": V,
            "period": V,
            "area_ha": D,
            "mean_probability": D,
            "mapped_area_ha": D,
            "first_seen_period": V,
            "source": V,
            "geometry": G,
        },
        geometry=POLYGONAL,
        area_column="area_ha",
        bbox_margin_deg=0.01,
        extra={"unique_ids": "site_id IN (SELECT site_id FROM t GROUP BY 1 HAVING count(*) > 1)"},
    ),
    "asm_change": Contract(
        "asm_change",
        {
            "change_id": V,
            "region": V,
            "period": V,
            "kind": V,
            "area_ha": D,
            "first_seen_period": V,
            "site_id": V,
            "mean_ndvi": D,
            "geometry": G,
        },
        geometry=POLYGONAL,
        area_column="area_ha",
        bbox_margin_deg=0.01,
        extra={
            "known_kinds": "kind NOT IN ('new', 'expanded', 'stable', 'abandoned', 'revegetating')"
        },
    ),
    "region_summary": Contract(
        "region_summary",
        {
            "region": V,
            "period": V,
            "site_count": B,
            "mining_ha": D,
            "new_ha": D,
            "expanded_ha": D,
            "stable_ha": D,
            "abandoned_ha": D,
            "revegetating_ha": D,
            "growth_vs_previous": D,
            "growth_vs_first": D,
        },
        may_be_empty=False,
        area_column="mining_ha",
        area_matches_geometry=False,
        extra={
            "growth_consistent": "previous_mining_ha > 0 AND abs(growth_vs_previous - mining_ha / previous_mining_ha) > 1e-4"
        },
    ),
    "context": Contract(
        "context",
        _CONTEXT_COLUMNS,
        keep_within_deg=KEEP_WITHIN_DEG,
        id_column="feature_id",
        geometry=(*POLYGONAL, "POINT", "MULTIPOINT", "LINESTRING", "MULTILINESTRING"),
        may_be_empty=False,
        area_column="area_ha",
        area_matches_geometry=False,
        area_nullable=True,
    ),
    "models": Contract(
        "models",
        {
            "model_id": V,
            "created_at": TSZ,
            "kind": V,
            "input_hash": V,
            "path": V,
            "heldout_iou": D,
            "baseline_heldout_iou": D,
        },
        may_be_empty=False,
        extra={
            "iou_in_0_1": "heldout_iou < 0 OR heldout_iou > 1 OR baseline_heldout_iou < 0 OR baseline_heldout_iou > 1",
            "unique_ids": "model_id IN (SELECT model_id FROM t GROUP BY 1 HAVING count(*) > 1)",
        },
    ),
    "concession_risk": Contract(
        "concession_risk",
        {
            "concession_id": V,
            "region": V,
            "period": V,
            "name": V,
            "asm_inside_ha": D,
            "new_asm_ha": D,
            "nearest_asm_m": D,
            **dict.fromkeys(_SCORES, D),
            "score": D,
            "band": V,
        },
        area_column="asm_inside_ha",
        area_matches_geometry=False,
        score_components=_SCORES,
    ),
    "protected_area_pressure": Contract(
        "protected_area_pressure",
        {
            "area_id": V,
            "kind": V,
            "region": V,
            "period": V,
            "name": V,
            "area_ha": D,
            "site_count": B,
            "asm_area_ha": D,
            "new_asm_ha": D,
            "share_of_area": D,
        },
        area_column="asm_area_ha",
        area_matches_geometry=False,
        extra={
            "share_in_0_1": "share_of_area < 0 OR share_of_area > 1.000001",
            "asm_within_area": "asm_area_ha > area_ha * 1.000001 + 0.01",
        },
    ),
    "hotspots": Contract(
        "hotspots",
        {
            "h3_cell": V,
            "region": V,
            "period": V,
            "resolution": I_,
            "asm_area_ha": D,
            "new_asm_ha": D,
            "site_count": I_,
            "geometry": G,
        },
        geometry=POLYGONAL,
        area_column="asm_area_ha",
        area_matches_geometry=False,
        bbox_margin_deg=0.2,
    ),
    "alerts": Contract(
        "alerts",
        {
            "alert_id": V,
            "alert_ref": V,
            "region": V,
            "period": V,
            "rank": B,
            "listed": "BOOLEAN",
            "severity": V,
            "change_id": V,
            "change_kind": V,
            "area_ha": D,
            "kinds": "VARCHAR[]",
            "feature_count": B,
            "summary": V,
            "created_at": TSZ,
            "geometry": G,
        },
        geometry=POLYGONAL,
        area_column="area_ha",
        bbox_margin_deg=0.01,
        extra={
            "known_severity": KNOWN_SEVERITY,
            "unique_ids": "alert_id IN (SELECT alert_id FROM t GROUP BY 1 HAVING count(*) > 1)",
            "one_per_change_area": "change_id IN (SELECT change_id FROM t GROUP BY 1 HAVING count(*) > 1)",
            "ranks_one_to_n": "rank < 1 OR rank > (SELECT count(*) FROM t) OR rank IN (SELECT rank FROM t GROUP BY 1 HAVING count(*) > 1)",
        },
    ),
    "alert_features": Contract(
        "alert_features",
        {
            "alert_id": V,
            "region": V,
            "period": V,
            "change_id": V,
            "change_ha": D,
            "kind": V,
            "relation": V,
            "severity": V,
            "feature_layer": V,
            "feature_id": V,
            "distance_m": D,
            "overlap_ha": D,
            "created_at": TSZ,
            "geometry": G,
        },
        geometry=POLYGONAL,
        area_column="change_ha",
        bbox_margin_deg=0.01,
        extra={
            "known_severity": KNOWN_SEVERITY,
            "known_relation": "relation NOT IN ('inside', 'within') OR (relation = 'inside') <> (distance_m = 0)",
            "unique_ids": "alert_id || feature_layer || feature_id IN (SELECT alert_id || feature_layer || feature_id FROM t GROUP BY 1 HAVING count(*) > 1)",
        },
    ),
}


@dataclass
class Outcome:
    """One check's result, ready for ``dg.AssetCheckResult``."""

    name: str
    passed: bool
    description: str
    severity: str = "ERROR"  # or WARN
    metadata: dict[str, Any] = field(default_factory=dict)


def _type_ok(actual: str, expected: str) -> bool:
    a = actual.upper()
    if expected == G:
        return a.startswith("GEOMETRY")
    if expected in (B, I_):  # integer widths vary with the writer
        return a in ("BIGINT", "INTEGER", "HUGEINT", "SMALLINT", "UBIGINT", "UINTEGER")
    return a == expected


def check_table(path: Path, contract: Contract, region: Region, *, view: str | None = None) -> list[Outcome]:  # fmt: skip
    """Run the four checks (and the contract's extra rules) on one Parquet file.

    The file is read through its catalog view's own SQL (sql/<view>_view.sql, with this
    one file in place of the glob), so the checks see the columns analysts query.
    ``view`` names the catalog view (default: the contract's table; a context layer's
    name for context tables).
    """
    from pipelines.stages.catalog import VIEWS, connect, create_view, files_literal

    name = view or contract.table
    con = connect()
    try:
        # Glob characters escaped: a data root named "data [ab]" is read, not "data a".
        files = [str(path.resolve())]
        raw = f"CREATE TEMP VIEW t AS SELECT * FROM read_parquet({files_literal(files)})"
        if name in VIEWS:
            try:
                create_view(con, name, VIEWS[name][0], files)
                con.execute(f"CREATE TEMP VIEW t AS SELECT * FROM {name}")
            except duckdb.BinderException:  # a column the view needs is missing
                con.execute(raw)  # the schema check names it
        else:
            con.execute(raw)
        return _checks(con, contract, region, path)
    finally:
        con.close()


def _count(con: Any, sql: str) -> int:
    return int(con.execute(sql).fetchone()[0])


def _checks(con: Any, c: Contract, region: Region, path: Path) -> list[Outcome]:
    out: list[Outcome] = []
    actual = {r[0]: r[1] for r in con.execute("DESCRIBE t").fetchall()}
    missing = [k for k in c.columns if k not in actual]
    wrong = {k: f"{actual[k]} (expected {v})" for k, v in c.columns.items() if k in actual and not _type_ok(actual[k], v)}  # fmt: skip
    out.append(
        Outcome(
            "schema", not missing and not wrong,
            f"{path.name}: " + ("all contract columns present with their types" if not missing and not wrong
                                else f"missing {missing}; wrong types {wrong}"),
            metadata={"missing": missing, "wrong_types": wrong, "columns": len(actual)},
        )
    )  # fmt: skip
    rows = _count(con, "SELECT count(*) FROM t")
    out.append(
        Outcome(
            "non_empty",
            rows > 0,
            f"{rows} row(s)"
            + (
                ""
                if rows
                else (" (allowed: this table may rightly be empty)" if c.may_be_empty else "")
            ),
            severity="WARN" if c.may_be_empty else "ERROR",
            metadata={"rows": rows},
        )
    )
    if missing or wrong:  # the other checks need the columns
        for name in ("geometry_valid", "areas_plausible"):
            out.append(Outcome(name, False, "not run: the schema check failed"))
        return out
    out.append(_geometry(con, c, region) if c.geometry else Outcome("geometry_valid", True, "no geometry column"))  # fmt: skip
    out.append(_areas(con, c, region))
    return out


def _geometry(con: Any, c: Contract, region: Region) -> Outcome:
    w, s, e, n = region.bbox
    m = c.bbox_margin_deg
    allowed = ", ".join(f"'{t}'" for t in c.geometry)
    if c.keep_within_deg is not None:  # the rule the layer was kept by
        kw = c.keep_within_deg
        outside = f"NOT ST_IsEmpty(geometry) AND NOT ST_Intersects(geometry, ST_MakeEnvelope({w - kw}, {s - kw}, {e + kw}, {n + kw}))"  # fmt: skip
    else:
        outside = (
            f"NOT ST_IsEmpty(geometry) AND (ST_XMin(geometry) < {w - m} OR ST_XMax(geometry) > {e + m} "
            f"OR ST_YMin(geometry) < {s - m} OR ST_YMax(geometry) > {n + m})"
        )  # fmt: skip
    bad = {
        "null_or_empty": "geometry IS NULL OR ST_IsEmpty(geometry)",
        "invalid": "NOT ST_IsEmpty(geometry) AND NOT ST_IsValid(geometry)",
        "wrong_type": f"ST_GeometryType(geometry)::VARCHAR NOT IN ({allowed})",
        "outside_region": outside,
    }
    counts = {k: _count(con, f"SELECT count(*) FROM t WHERE {v}") for k, v in bad.items()}
    examples = {}
    for k, v in bad.items():
        if counts[k]:
            key = c.id_column or next(iter(c.columns))
            examples[k] = [str(r[0]) for r in con.execute(f"SELECT {key} FROM t WHERE {v} LIMIT 3").fetchall()]  # fmt: skip
    ok = not any(counts.values())
    return Outcome(
        "geometry_valid", ok,
        "every geometry present, valid, " + "/".join(c.geometry).lower() + " and within the region"
        if ok else "bad geometries: " + ", ".join(f"{k} {v}" for k, v in counts.items() if v),
        metadata={"bad": counts, "examples": examples},
    )  # fmt: skip


def _areas(con: Any, c: Contract, region: Region) -> Outcome:
    from pipelines.infra.vectors import aoi_area_ha

    problems: dict[str, int] = {}
    meta: dict[str, Any] = {}
    if c.area_column:
        a = c.area_column
        null = "FALSE" if c.area_nullable else f"{a} IS NULL"
        problems["negative_or_not_finite"] = _count(
            con, f"SELECT count(*) FROM t WHERE {null} OR NOT isfinite({a}) OR {a} < 0"
        )
        total = float(con.execute(f"SELECT coalesce(sum({a}), 0) FROM t WHERE isfinite({a})").fetchone()[0])  # fmt: skip
        aoi_ha = aoi_area_ha(region)
        meta.update(total_ha=round(total, 4), aoi_ha=round(aoi_ha, 2))
        if c.table in ("asm_sites", "asm_change"):  # disjoint polygons inside the AOI
            problems["total_exceeds_aoi"] = int(total > aoi_ha * (1 + AREA_RTOL))
        elif c.table == "region_summary":
            problems["total_exceeds_aoi"] = _count(con, f"SELECT count(*) FROM t WHERE {a} > {aoi_ha * (1 + AREA_RTOL)}")  # fmt: skip
        if c.area_matches_geometry and c.geometry:
            epsg = bbox_utm_epsg(region.bbox)
            utm = f"ST_Area(ST_Transform(geometry, 'EPSG:4326', 'EPSG:{epsg}', always_xy := true)) / 10000"  # fmt: skip
            problems["area_differs_from_geometry"] = _count(
                con,
                f"SELECT count(*) FROM t WHERE NOT ST_IsEmpty(geometry) AND "
                f"abs({a} - {utm}) > {AREA_ATOL_HA} + {AREA_RTOL} * {a}",
            )
    if c.score_components:
        parts = " + ".join(c.score_components)
        problems["score_outside_0_100"] = _count(
            con, "SELECT count(*) FROM t WHERE score < 0 OR score > 100 OR score IS NULL OR "
            + " OR ".join(f"{s} < 0 OR {s} IS NULL" for s in c.score_components),
        )  # fmt: skip
        problems["score_not_sum_of_components"] = _count(con, f"SELECT count(*) FROM t WHERE abs(score - ({parts})) > 0.05 + 1e-9")  # fmt: skip
    for name, cond in c.extra.items():
        problems[name] = _count(con, f"SELECT count(*) FROM t WHERE {cond}")
    ok = not any(problems.values())
    return Outcome(
        "areas_plausible",
        ok,
        "areas and scores plausible"
        if ok
        else "implausible: " + ", ".join(f"{k} {v}" for k, v in problems.items() if v),
        metadata={"problems": problems, **meta},
    )
