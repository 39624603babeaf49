"""Regions configuration: the YAML file that says where and when asmwatch looks.

First step of the flow: everything downstream (the STAC search, the composite grid, the
partitions) is driven by the typed ``Region`` objects built here.

The file's schema is a set of pydantic v2 models (``RegionEntry`` and the blocks it
holds: ``Aoi``, ``SeriesSpec``, ``EmbeddedSpec``, ``RefreshSpec``, ``DetectionsSpec``):
Literal fields for the closed sets, field validators for AOIs, periods and cron. Loading
collects every problem in the file, and ``_problems`` words each pydantic error in the
house style, naming the field path (``regions[2] (mdd).aoi.bbox: ...``) and what is
wrong, so ``asmwatch validate`` can print them all at once.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import shapely
import shapely.geometry
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails

from pipelines.i18n import Language

DEFAULT_REGIONS_FILE = "regions.yaml"
_MODEL_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

#: Source presets; a region may also give the http(s) URL of any STAC API.
Source = Literal["earth-search", "planetary-computer", "embedded"]
KNOWN_SOURCES: tuple[str, ...] = get_args(Source)

#: Public STAC endpoints of the source presets; ``embedded`` is started by asmwatch.
SOURCE_URLS: dict[str, str] = {
    "earth-search": "https://earth-search.aws.element84.com/v1",
    "planetary-computer": "https://planetarycomputer.microsoft.com/api/stac/v1",
}
DEFAULT_COLLECTION = "sentinel-2-l2a"
DEFAULT_L1C_COLLECTION = "sentinel-2-l1c"

#: Cloud masks a composite can use: Sen2Cor's SCL alone, or SCL plus s2cloudless run
#: on the matching L1C scene (s2cloudless needs top-of-atmosphere bands, B10 among them,
#: which L2A does not carry; Earth Search has them as ``sentinel-2-l1c``).
#: The 14 biomes of the WWF / RESOLVE Ecoregions 2017 map, short: what ``auto`` matches a
#: region's ``biome`` against in a model's domain (docs/detection.md).
Biome = Literal[
    "tropical moist forest", "tropical dry forest", "tropical coniferous forest",
    "temperate broadleaf forest", "temperate coniferous forest", "boreal forest",
    "tropical grassland and savanna", "temperate grassland", "flooded grassland",
    "montane grassland", "tundra", "mediterranean woodland", "desert and xeric shrubland",
    "mangrove",
]  # fmt: skip
CloudMask = Literal["scl", "scl+s2cloudless"]
CLOUD_MASKS: tuple[str, ...] = get_args(CloudMask)
S2CLOUDLESS: CloudMask = "scl+s2cloudless"

#: Context-layer kinds a region may bring (see docs/data-dictionary.md).
ContextKind = Literal[
    "protected_areas",
    "indigenous_lands",
    "concessions",
    "settlements",
    "rivers",
    "grievances",
    "detections",
    "mining_labels",  # polygons of mining, or labelled points, to train and evaluate on
]
CONTEXT_KINDS: tuple[str, ...] = get_args(ContextKind)

#: Attribute roles a context layer's columns can be mapped to (regions file:
#: ``context: {kind: {file: ..., <role>: <column>}}``); see pipelines/stages/context.py.
CONTEXT_ROLES: dict[str, tuple[str, ...]] = {
    "protected_areas": ("id", "name", "category"),
    "indigenous_lands": ("id", "name", "category"),
    "concessions": ("id", "name", "category", "holder", "status"),
    "settlements": ("id", "name", "category", "population", "lon", "lat"),
    "rivers": ("id", "name", "category"),
    "grievances": ("id", "date", "category", "status", "place", "concession", "lon", "lat"),
    "detections": ("id",),
    "mining_labels": ("period",),
}

#: How often open-ended periods repeat; how a schedule picks periods; how imported
#: detections are read; what a grievance's status may mean (open ones count in risk).
PeriodStep = Literal["year", "quarter"]
PERIOD_STEPS: tuple[str, ...] = get_args(PeriodStep)
RefreshPeriod = Literal["current", "all"]
REFRESH_PERIODS: tuple[str, ...] = get_args(RefreshPeriod)
DetectionMode = Literal["presence", "new"]
DETECTION_MODES: tuple[str, ...] = get_args(DetectionMode)
GrievanceState = Literal["open", "closed"]
GRIEVANCE_STATES: tuple[str, ...] = get_args(GrievanceState)

# Ids become directory names, partition keys and SQL literals in views: keep them to a
# safe alphabet so no id can escape the data root or break a statement.
_ID_RE = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
_PERIOD_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$")
_YEAR_RE = re.compile(r"^(\d{4})$")
_QUARTER_RE = re.compile(r"^(\d{4})Q([1-4])$")
_COLLECTION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_URL_RE = re.compile(r"^https?://[^\s/$.?#][^\s]*$")


class RegionsError(ValueError):
    """A regions file with one or more problems; ``problems`` lists each of them."""

    def __init__(self, source: str, problems: Sequence[str]) -> None:
        self.source = source
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{source}: {len(self.problems)} problem(s)\n{lines}")


@dataclass(frozen=True)
class Period:
    """A time window of one partition: a year, a quarter or an explicit date range."""

    id: str
    start: dt.date
    end: dt.date  # inclusive

    @property
    def datetime_range(self) -> str:
        """The period as a STAC ``datetime`` interval (UTC, end of the last day)."""
        return f"{self.start.isoformat()}T00:00:00Z/{self.end.isoformat()}T23:59:59Z"


def year_or_quarter(period_id: str) -> Period | None:
    """The calendar year (``2021``) or quarter (``2021Q3``) with that id; None if neither."""
    if m := _YEAR_RE.match(period_id):
        year = int(m.group(1))
        return Period(period_id, dt.date(year, 1, 1), dt.date(year, 12, 31))
    if m := _QUARTER_RE.match(period_id):
        year, q = int(m.group(1)), int(m.group(2))
        end = (
            dt.date(year, 12, 31) if q == 4 else dt.date(year, 3 * q + 1, 1) - dt.timedelta(days=1)
        )
        return Period(period_id, dt.date(year, 3 * q - 2, 1), end)
    return None


@dataclass(frozen=True)
class PeriodSeries:
    """Open-ended periods: every year (or quarter) from ``first``, up to ``last`` if given.

    The regions file says ``periods: {from: 2019, every: year}``; the region's periods
    are then the series' periods that have started, so a new year's partition appears
    when the year begins, without editing the file.
    """

    every: PeriodStep
    first: Period
    last: Period | None = None

    def _id(self, year: int, index: int) -> str:
        return str(year) if self.every == "year" else f"{year}Q{index}"

    def containing(self, day: dt.date) -> Period:
        """The year (quarter) that contains ``day``."""
        index = 1 if self.every == "year" else (day.month - 1) // 3 + 1
        out = year_or_quarter(self._id(day.year, index))
        assert out is not None
        return out

    def next(self, period: Period) -> Period:
        return self.containing(period.end + dt.timedelta(days=1))

    def until(self, day: dt.date) -> tuple[Period, ...]:
        """The series' periods that have started by ``day`` (at least the first)."""
        out = [self.first]
        while True:
            nxt = self.next(out[-1])
            if nxt.start > day or (self.last is not None and nxt.start > self.last.start):
                return tuple(out)
            out.append(nxt)

    def get(self, period_id: str) -> Period | None:
        """The series' period with that id, started or not; None if not in the series."""
        p = year_or_quarter(period_id)
        if p is None or (self.every == "year") != ("Q" not in period_id):
            return None
        if p.start < self.first.start or (self.last is not None and p.start > self.last.start):
            return None
        return p

    def describe(self) -> str:
        to = f" to {self.last.id}" if self.last is not None else ""
        return f"every {self.every} from {self.first.id}{to}"


def utc_today() -> dt.date:
    return dt.datetime.now(dt.UTC).date()


# ------------------------------------------------------------------ the file's schema


class _Problems(ValueError):
    """Problems a validator found, each ``<where>: <message>`` with ``where`` relative to
    the field it validates (``""``, ``"[1].start"``, ``".bbox"``); ``_problems`` puts the
    field's path in front."""

    def __init__(self, items: Sequence[str]) -> None:
        self.items = list(items)
        super().__init__("; ".join(self.items))


def _checked(parse: Callable[..., Any], value: Any, *args: Any) -> Any:
    """Run a ``parse(value, where, problems, ...)`` helper; raise ``_Problems`` if it found any."""
    problems: list[str] = []
    out = parse(value, "", problems, *args)
    if problems:
        raise _Problems(problems)
    return out


def _says(**extra: str) -> dict[str, Any]:
    """Field metadata ``_problems`` reads: ``unknown`` words a Literal field's bad value
    (``{value!r}``, ``{choices}``); ``kind`` names a number field's kind."""
    return dict(extra)


class _Spec(BaseModel):
    """A block of the regions file: unknown keys refused, no coercion (``"yes"`` is not
    a boolean, ``true`` is not a number), immutable once read."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        strict=True,
        validate_by_name=True,
        validate_by_alias=True,
        arbitrary_types_allowed=True,
    )


def _base_dir(info: ValidationInfo) -> Path | None:
    context = info.context if isinstance(info.context, Mapping) else {}
    base = context.get("base_dir")
    return Path(base) if base is not None else None


def _resolve(path: str, base_dir: Path | None) -> str:
    p = Path(path)
    if not p.is_absolute() and base_dir is not None:
        p = base_dir / p
    return str(p)


class EmbeddedSpec(_Spec):
    """How the embedded Sentinel-2 simulator builds this region's world."""

    seed: int = Field(default=42, ge=0, le=2**32 - 1, json_schema_extra=_says(kind="whole number"))
    scenes_per_period: int = Field(
        default=4, ge=1, le=24, json_schema_extra=_says(kind="whole number")
    )
    growth_factor: float = Field(
        default=1.5, ge=1.0, le=10.0, json_schema_extra=_says(kind="float")
    )
    reprocessed_twins: bool = True


class RefreshSpec(_Spec):
    """When Dagster refreshes a region (schedule ``refresh_<id>``, sensor ``new_scenes``).

    ``cron``: the schedule's cadence (five-field cron, in ``timezone``); empty: no
    schedule. ``watch_scenes``: the ``new_scenes`` sensor looks for scenes of the current
    period that were not in its last run. ``period``: ``current`` refreshes the period
    containing today (else the latest one), ``all`` every period.
    """

    cron: str = ""
    timezone: str = "UTC"
    watch_scenes: bool = True
    period: RefreshPeriod = Field(
        default="current", json_schema_extra=_says(unknown="{value!r}: use one of {choices}")
    )

    @field_validator("cron")
    @classmethod
    def _cron(cls, cron: str) -> str:
        if cron and not _valid_cron(cron):
            raise ValueError(
                f"{cron!r} is not a five-field cron expression "
                "(minute hour day-of-month month day-of-week, e.g. '0 6 * * 1')"
            )
        return cron

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, tz: str) -> str:
        import zoneinfo

        try:
            zoneinfo.ZoneInfo(tz)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"unknown time zone {tz!r} (an IANA name like 'UTC', 'America/Lima')"
            ) from None
        return tz


class DetectionsSpec(_Spec):
    """A file of external ASM polygons that replaces the model's sites for a region.

    ``mode``: ``presence`` (each feature is mining present in its period) or ``new``
    (each feature is mining first seen in its period, as Amazon Mining Watch's "new
    mining" layers: a period's sites are every feature of that period or earlier).
    """

    path: str = Field(alias="file", description="the file of polygons (GeoJSON, GeoPackage, ...)")  # fmt: skip
    period_field: str = "period"
    mapped_area_field: str | None = None  # the provider's own mined area (ha), if any
    period: str | None = None  # one period for every feature (a file with no period column)
    id_field: str | None = None
    mode: DetectionMode = "presence"

    @field_validator("path")
    @classmethod
    def _file(cls, path: str, info: ValidationInfo) -> str:
        if not path.strip():
            raise ValueError("must be a file path")
        return _resolve(path, _base_dir(info))

    @field_validator("period_field", "mapped_area_field", "id_field")
    @classmethod
    def _column(cls, column: str | None) -> str | None:
        if column is not None and not column.strip():
            raise ValueError("must be a column name")
        return column

    @field_validator("period", mode="before")
    @classmethod
    def _period(cls, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        return _checked(_parse_period, value).id

    @model_validator(mode="after")
    def _one_period_source(self) -> DetectionsSpec:
        if self.period is not None and "period_field" in self.model_fields_set:
            raise _Problems([
                ": give either period (one period for every feature) or period_field (a "
                "column of the file), not both"
            ])  # fmt: skip
        return self


@dataclass(frozen=True)
class ContextSpec:
    """A region's context layers: kind -> file; kind -> {role: column} (and ``crs``)
    for layers given as a mapping; grievance status values -> open | closed."""

    files: Mapping[str, str] = field(default_factory=dict)
    fields: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    status_values: Mapping[str, str] = field(default_factory=dict)


_AOI_HINT = "give 'bbox: [west, south, east, north]' or 'geometry'"


class Aoi(_Spec):
    """Where a region is: a bbox or a GeoJSON (Multi)Polygon, in EPSG:4326."""

    bbox: tuple[float, float, float, float] | None = None
    geometry: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _one_of(cls, value: Any) -> Any:
        if not isinstance(value, Mapping):
            raise ValueError(f"must be a mapping: {_AOI_HINT}")
        if not ({"bbox", "geometry"} & set(value)):
            raise ValueError(f"missing; {_AOI_HINT}")
        if "bbox" in value and "geometry" in value:
            raise ValueError("give either bbox or geometry, not both")
        return value

    @field_validator("bbox", mode="plain")
    @classmethod
    def _bbox(cls, value: Any) -> tuple[float, float, float, float] | None:
        return None if value is None else _checked(_parse_bbox, value)

    @field_validator("geometry", mode="plain")
    @classmethod
    def _geometry(cls, value: Any) -> dict[str, Any] | None:
        return None if value is None else _checked(_parse_geometry, value)[1]

    def bounds_and_geometry(self) -> tuple[tuple[float, float, float, float], dict[str, Any]]:
        if self.bbox is not None:
            return self.bbox, shapely.geometry.mapping(shapely.geometry.box(*self.bbox))
        assert self.geometry is not None
        w, s, e, n = shapely.geometry.shape(self.geometry).bounds
        return (w, s, e, n), self.geometry


class SeriesSpec(_Spec):
    """Open-ended periods: ``{from: 2019, every: year}`` or ``{from: 2021Q1, every: quarter, to: 2024Q4}``."""

    first: Period = Field(alias="from", description="give the first year or quarter (2019, 2019Q1)")  # fmt: skip
    every: PeriodStep = Field(json_schema_extra=_says(unknown="{value!r}: use one of {choices}"))
    last: Period | None = Field(default=None, alias="to")

    @field_validator("first", "last", mode="plain")
    @classmethod
    def _period(cls, value: Any) -> Period | None:
        if value is None:
            return None
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            raise ValueError(f"{value!r} is not a year or a quarter")
        period: Period = _checked(_parse_period, value)
        return period

    @model_validator(mode="after")
    def _consistent(self) -> SeriesSpec:
        problems = [
            f".{key}: {p.id!r} is not a {self.every} (every: {self.every})"
            for key, p in (("from", self.first), ("to", self.last))
            if p is not None and (self.every == "year") != ("Q" not in p.id)
        ]
        if not problems and self.last is not None and self.last.start < self.first.start:
            problems.append(f": to {self.last.id} is before from {self.first.id}")
        if problems:
            raise _Problems(problems)
        return self

    def series(self) -> PeriodSeries:
        return PeriodSeries(self.every, self.first, self.last)


class RegionEntry(_Spec):
    """One region as the file gives it (after ``defaults`` are merged in)."""

    id: str = Field(description="a safe id, e.g. madre-de-dios")
    name: str | None = None
    description: str = ""
    aoi: Aoi = Field(description=_AOI_HINT)
    periods: tuple[Period, ...] | PeriodSeries = Field(
        description="a list of years, quarters or date ranges, or {from: 2019, every: year}"
    )
    source: str = "earth-search"
    collection: str = DEFAULT_COLLECTION
    max_cloud_cover: float = Field(default=60, ge=0, le=100)
    min_valid_fraction: float = Field(default=0.5, ge=0, le=1)
    cloud_mask: CloudMask = Field(
        default="scl",
        json_schema_extra=_says(unknown="unknown cloud mask {value!r}: use one of {choices}"),
    )
    l1c_collection: str = DEFAULT_L1C_COLLECTION
    context: ContextSpec = ContextSpec()
    embedded: EmbeddedSpec | None = None
    detections: DetectionsSpec | None = None
    refresh: RefreshSpec = RefreshSpec()
    country: tuple[str, ...] = Field(
        default=(),
        description="ISO 3166-1 alpha-2 code(s) of the region's country or countries, e.g. PE",
    )
    language: Language | None = Field(
        default=None,
        json_schema_extra=_says(unknown="{value!r}: reports are written in {choices}"),
    )
    model: str = Field(
        default="auto",
        description="auto, none (the spectral index baseline) or a registered model id",
    )
    biome: Biome | None = Field(
        default=None,
        json_schema_extra=_says(unknown="unknown biome {value!r}: use one of {choices}"),
    )

    @field_validator("model")
    @classmethod
    def _model(cls, model: str) -> str:
        if model not in ("auto", "none") and not _MODEL_ID_RE.match(model):
            raise ValueError(
                f"{model!r} is not a model choice: use auto (a model trained on this region "
                "or on real imagery of its country), none (the spectral index baseline) or a "
                "registered model id such as unet-20261202T103638-098f347c"
            )
        return model

    @field_validator("country", mode="plain")
    @classmethod
    def _country(cls, value: Any) -> tuple[str, ...]:
        from pipelines.i18n import countries

        codes = [value] if isinstance(value, str) else value
        if not isinstance(codes, (list, tuple)) or not all(isinstance(c, str) for c in codes):
            raise ValueError(f"{value!r} must be a country code (e.g. PE) or a list of them")
        known = countries()
        bad = [c for c in codes if c not in known]
        if bad:
            raise ValueError(
                f"unknown country code(s) {', '.join(map(repr, bad))}: use ISO 3166-1 "
                "alpha-2 codes in capitals, e.g. PE (Peru), SR (Suriname), ML (Mali)"
            )
        return tuple(codes)

    @field_validator("id")
    @classmethod
    def _safe_id(cls, rid: str) -> str:
        if not _ID_RE.match(rid):
            raise ValueError(
                f"{rid!r} is not a safe id: use 1-63 lowercase letters, digits, '-' or '_', "
                "starting with a letter (ids name folders and SQL values, so '/', '..', "
                "quotes and spaces are refused)"
            )
        return rid

    @field_validator("name")
    @classmethod
    def _name(cls, name: str | None) -> str | None:
        if name is not None and not name.strip():
            raise ValueError("must be a non-empty string")
        return name

    @field_validator("periods", mode="plain")
    @classmethod
    def _periods(cls, value: Any) -> tuple[Period, ...] | PeriodSeries:
        if isinstance(value, Mapping):
            try:
                return SeriesSpec.model_validate(value).series()
            except ValidationError as e:
                raise _Problems(_problems(e, SeriesSpec)) from None
        return tuple(_checked(_parse_periods, value))

    @field_validator("source")
    @classmethod
    def _source(cls, source: str) -> str:
        if source not in KNOWN_SOURCES and not _URL_RE.match(source):
            raise ValueError(
                f"unknown source {source!r}: use one of {', '.join(KNOWN_SOURCES)} or an "
                "http(s) URL of a STAC API"
            )
        return source

    @field_validator("collection", "l1c_collection")
    @classmethod
    def _collection(cls, collection: str) -> str:
        if not _COLLECTION_RE.match(collection):
            raise ValueError(f"{collection!r} is not a valid collection id")
        return collection

    @field_validator("context", mode="plain")
    @classmethod
    def _context(cls, value: Any, info: ValidationInfo) -> ContextSpec:
        files, fields, status_values = _checked(_parse_context, value, _base_dir(info))
        return ContextSpec(files, fields, status_values)

    @field_validator("refresh", mode="before")
    @classmethod
    def _no_refresh(cls, value: Any) -> Any:
        return {} if value is None else value

    @model_validator(mode="after")
    def _s2cloudless_needs_l1c(self) -> RegionEntry:
        if self.cloud_mask == S2CLOUDLESS and self.source == "planetary-computer":
            raise _Problems([
                ".cloud_mask: s2cloudless needs Sentinel-2 L1C scenes, which Planetary "
                "Computer does not serve; use source earth-search (or a STAC API with L1C)"
            ])  # fmt: skip
        return self

    def region(self) -> Region:
        bbox, geometry = self.aoi.bounds_and_geometry()
        series = self.periods if isinstance(self.periods, PeriodSeries) else None
        periods = series.until(utc_today()) if series is not None else self.periods
        assert isinstance(periods, tuple)
        embedded = self.embedded
        if embedded is None and self.source == "embedded":
            embedded = EmbeddedSpec()
        return Region(
            id=self.id,
            name=self.name if self.name is not None else self.id,
            description=self.description,
            bbox=bbox,
            geometry=geometry,
            periods=periods,
            source=self.source,
            collection=self.collection,
            max_cloud_cover=float(self.max_cloud_cover),
            context=dict(self.context.files),
            context_fields={k: dict(v) for k, v in self.context.fields.items()},
            status_values=dict(self.context.status_values),
            embedded=embedded,
            min_valid_fraction=float(self.min_valid_fraction),
            cloud_mask=self.cloud_mask,
            l1c_collection=self.l1c_collection,
            detections=self.detections,
            refresh=self.refresh,
            series=series,
            country=self.country,
            language_setting=self.language,
            model=self.model,
            biome=self.biome,
        )


def _problems(error: ValidationError, model: type[BaseModel]) -> list[str]:
    """Each of pydantic's errors as ``<path>: <what is wrong>``, the path relative to
    ``model`` (``.aoi.bbox``, ``.periods[1].start``), in the house's words."""
    out: list[str] = []
    for e in error.errors(include_url=False):
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e["loc"])
        cause = (e.get("ctx") or {}).get("error")
        if isinstance(cause, _Problems):
            out.extend(where + item for item in cause.items)
        else:
            out.append(f"{where}: {_message(e, model)}")
    return out


def _message(e: ErrorDetails, model: type[BaseModel]) -> str:
    loc, kind, value = e["loc"], e["type"], e["input"]
    info = _field_at(model, loc)
    says = info.json_schema_extra if info is not None and isinstance(info.json_schema_extra, dict) else {}  # fmt: skip
    if kind == "extra_forbidden":
        parent = _model_at(model, loc[:-1])
        known = sorted(f.alias or name for name, f in parent.model_fields.items()) if parent else []
        return f"unknown field (known: {', '.join(known)})"
    if kind == "missing":
        hint = info.description if info is not None else None
        return f"missing; {hint}" if hint else "missing"
    if kind == "literal_error":
        choices = ", ".join(re.findall(r"'([^']*)'", str((e.get("ctx") or {}).get("expected", ""))))
        template = str(says.get("unknown", "{value!r} must be one of {choices}"))
        return template.format(value=value, choices=choices)
    bounds = _bounds(info)
    if bounds is not None and kind in _NUMBER_ERRORS:
        lo, hi = (int(b) if b.is_integer() else b for b in bounds)
        return f"{value!r} must be a {says.get('kind', 'number')} from {lo} to {hi}"
    if kind == "bool_type":
        return f"{value!r} must be true or false"
    if kind == "string_type":
        return f"{value!r} must be text"
    if kind in ("model_type", "dict_type"):
        sub = _model_at(model, loc)
        fields = f" ({', '.join(f.alias or n for n, f in sub.model_fields.items())})" if sub else ""
        return f"must be a mapping{fields}, got {type(value).__name__}"
    if kind == "value_error":
        return str((e.get("ctx") or {}).get("error", e["msg"]))
    return e["msg"]


_NUMBER_ERRORS = {
    "greater_than_equal", "less_than_equal", "float_type", "int_type", "int_from_float",
    "finite_number",
}  # fmt: skip


def _bounds(info: FieldInfo | None) -> tuple[float, float] | None:
    if info is None:
        return None
    lo = next((m.ge for m in info.metadata if hasattr(m, "ge")), None)
    hi = next((m.le for m in info.metadata if hasattr(m, "le")), None)
    return (float(lo), float(hi)) if lo is not None and hi is not None else None


def _field_at(model: type[BaseModel], loc: tuple[int | str, ...]) -> FieldInfo | None:
    """The field an error's ``loc`` points at, following nested models."""
    parent = _model_at(model, loc[:-1])
    if parent is None or not loc or not isinstance(loc[-1], str):
        return None
    by_name = {f.alias or n: f for n, f in parent.model_fields.items()}
    return by_name.get(loc[-1])


def _model_at(model: type[BaseModel], loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    current: type[BaseModel] | None = model
    for part in loc:
        if current is None or not isinstance(part, str):
            return None
        info = {f.alias or n: f for n, f in current.model_fields.items()}.get(part)
        if info is None:
            return None
        candidates = (info.annotation, *get_args(info.annotation))
        current = next(
            (c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None
        )
    return current


@dataclass(frozen=True)
class Region:
    id: str
    name: str
    bbox: tuple[float, float, float, float]  # west, south, east, north (EPSG:4326)
    geometry: dict[str, Any]  # GeoJSON, EPSG:4326
    periods: tuple[Period, ...]
    source: str  # a preset name or an http(s) URL
    collection: str
    max_cloud_cover: float
    context: Mapping[str, str] = field(default_factory=dict)  # layer kind -> file
    # layer kind -> {role: column} (and "crs" for CSV coordinates), from the mapping form
    context_fields: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    # grievance status values of the region's file -> open | closed (beside the defaults)
    status_values: Mapping[str, str] = field(default_factory=dict)
    embedded: EmbeddedSpec | None = None
    min_valid_fraction: float = 0.5
    description: str = ""
    cloud_mask: str = "scl"
    l1c_collection: str = DEFAULT_L1C_COLLECTION
    detections: DetectionsSpec | None = None
    refresh: RefreshSpec = field(default_factory=RefreshSpec)
    #: Open-ended periods (``periods: {from: 2019, every: year}``); ``periods`` then holds
    #: the series' periods that had started when the file was read.
    series: PeriodSeries | None = None
    #: ISO 3166-1 alpha-2 codes; the reports' language follows the first (``language``).
    country: tuple[str, ...] = ()
    #: The ``language`` the regions file sets, or None to follow ``country``.
    language_setting: str | None = None
    #: Which model maps the region: ``auto``, ``none`` or a model id
    #: (``pipelines.stages.detection.choose_model``).
    model: str = "auto"
    #: The region's biome (``Biome``), or None: ``auto`` may then take a model trained
    #: on real imagery of the same biome.
    biome: str | None = None

    @property
    def language(self) -> str:
        """The language of the region's reports (``pipelines.i18n.region_language``)."""
        from pipelines.i18n import region_language

        return region_language(self.language_setting, self.country)[0]

    @property
    def language_reason(self) -> str:
        from pipelines.i18n import region_language

        return region_language(self.language_setting, self.country)[1]

    @property
    def uses_s2cloudless(self) -> bool:
        return self.cloud_mask == "scl+s2cloudless"

    @property
    def stac_url(self) -> str | None:
        """The STAC API root for a preset or URL source; None for ``embedded``."""
        if self.source == "embedded":
            return None
        return SOURCE_URLS.get(self.source, self.source)

    def period(self, period_id: str) -> Period:
        for p in self.periods:
            if p.id == period_id:
                return p
        if self.series is not None and (later := self.series.get(period_id)) is not None:
            if later.start > utc_today():  # the file was read before it began, or it has not
                raise KeyError(
                    f"region {self.id!r}: period {period_id!r} has not begun (it starts "
                    f"{later.start.isoformat()}; periods {self.series.describe()})"
                )
            return later
        known = ", ".join(p.id for p in self.periods)
        if self.series is not None:
            known = f"{self.series.describe()}: {known}"
        raise KeyError(f"region {self.id!r} has no period {period_id!r} (it has: {known})")

    def periods_until(self, today: dt.date) -> tuple[Period, ...]:
        """The periods that have started by ``today`` (every listed one for a fixed list)."""
        if self.series is not None:
            return self.series.until(today)
        return self.periods

    def current_period(self, today: dt.date) -> Period:
        """The period containing ``today``; else the latest one that has started; else the first.

        Open-ended periods roll forward: on 2027-01-04 a ``{from: 2019, every: year}``
        region's current period is 2027, whenever the file was read.
        """
        periods = self.periods_until(today)
        for p in periods:
            if p.start <= today <= p.end:
                return p
        started = [p for p in periods if p.start <= today]
        return max(started, key=lambda p: p.start) if started else periods[0]

    def previous_period(self, period_id: str) -> Period | None:
        period = self.period(period_id)
        periods = self.periods_until(max(period.start, utc_today()))
        ids = [p.id for p in periods]
        i = ids.index(period.id)
        return periods[i - 1] if i > 0 else None


@dataclass(frozen=True)
class RegionsConfig:
    path: Path
    regions: tuple[Region, ...]

    def get(self, region_id: str) -> Region:
        for r in self.regions:
            if r.id == region_id:
                return r
        known = ", ".join(r.id for r in self.regions)
        raise KeyError(f"no region {region_id!r} in {self.path} (known: {known})")

    @property
    def ids(self) -> list[str]:
        return [r.id for r in self.regions]

    def partition_keys(self, today: dt.date | None = None) -> list[str]:
        """Every ``region|period`` partition key of the file, periods that have begun by
        ``today`` for open-ended ones, region by region in file order."""
        day = today or utc_today()
        return [partition_key(r.id, p.id) for r in self.regions for p in r.periods_until(day)]

    def all_period_ids(self) -> list[str]:
        """Every period id used by any region, in first-seen order (sorted within kind)."""
        seen: dict[str, None] = {}
        for r in self.regions:
            for p in r.periods:
                seen.setdefault(p.id, None)
        return sorted(seen)


def partition_key(region_id: str, period_id: str) -> str:
    """The key of a region's period in Dagster and in run records: ``region|period``."""
    return f"{region_id}|{period_id}"


def split_partition_key(key: str) -> tuple[str, str]:
    """``(region, period)`` of a ``region|period`` key; ValueError naming it otherwise."""
    region_id, sep, period_id = key.partition("|")
    if not sep or not region_id or not period_id:
        raise ValueError(f"{key!r} is not a region|period partition key")
    return region_id, period_id


def regions_path() -> Path:
    """The regions file: ``$ASMWATCH_REGIONS``, else ``regions.yaml`` in the working
    directory, else the project's own (the project root's in a checkout, through the
    pipelines/regions.yaml link; package data in an installed wheel)."""
    if env := os.environ.get("ASMWATCH_REGIONS"):
        return Path(env)
    local = Path(DEFAULT_REGIONS_FILE)
    if local.exists():
        return local
    return (Path(__file__).resolve().parent / DEFAULT_REGIONS_FILE).resolve()  # the link's target


def load_regions(path: str | os.PathLike[str] | None = None) -> RegionsConfig:
    """Read and validate a regions file; raise ``RegionsError`` listing every problem."""
    p = Path(path) if path is not None else regions_path()
    if not p.exists():
        raise RegionsError(str(p), [f"file not found (set ASMWATCH_REGIONS or create {p})"])
    size = p.stat().st_size
    if size > MAX_REGIONS_BYTES:
        raise RegionsError(str(p), [
            f"the file is {size / 1e6:.1f} MB, over the {MAX_REGIONS_BYTES / 1e6:.0f} MB a "
            "regions file may be; an AOI outline this large slows every run: simplify it "
            "(a few thousand vertices are plenty at 10 m), or give a bbox"
        ])  # fmt: skip
    raw = p.read_bytes()
    key = (str(p.resolve()), hashlib.sha1(raw).hexdigest(), utc_today())
    if (cached := _PARSED.get(key)) is not None:
        return cached
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RegionsError(str(p), [
            f"not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}): is it a "
            "regions YAML file? Save it as UTF-8"
        ]) from None  # fmt: skip
    if "\x00" in text:
        raise RegionsError(str(p), [f"binary data (a NUL byte at offset {text.index(chr(0))}): not a regions YAML file"])  # fmt: skip
    try:
        doc = yaml.load(text, Loader=_StrictLoader)  # a safe loader (below)
    except yaml.YAMLError as e:
        raise RegionsError(str(p), [f"not valid YAML: {e}"]) from None
    config = parse_regions(doc, source=str(p), base_dir=p.parent)
    if len(_PARSED) >= 16:
        _PARSED.clear()
    _PARSED[key] = config
    return config


#: Parsed regions files by (path, content digest, day): a file is parsed once per
#: process and day (open-ended periods are expanded up to the day it is read).
_PARSED: dict[tuple[str, str, dt.date], RegionsConfig] = {}


#: Larger than any sensible regions file (the Madre de Dios outline is 0.1 MB); YAML
#: parsing takes about 1 s per MB even with libyaml.
MAX_REGIONS_BYTES = 2_000_000

_BaseLoader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when present


class _StrictLoader(_BaseLoader):
    """YAML's safe loader (libyaml's, fast) that refuses a key given twice in a mapping:
    with plain YAML the last one wins silently, and a region's second ``periods`` or
    ``aoi`` would replace the first without a word."""

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: dict[Any, Any] = {}
        for key_node, _value in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                continue  # the base loader reports unhashable keys
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark,
                    f"found the key {key!r} twice (first at line {seen[key].line + 1}); "
                    "remove one of them", key_node.start_mark,
                )  # fmt: skip
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def parse_regions(
    doc: Any, source: str = "<regions>", base_dir: Path | None = None
) -> RegionsConfig:
    """Validate an already-parsed regions document; ``RegionsError`` lists every problem."""
    problems: list[str] = []
    if not isinstance(doc, Mapping) or "regions" not in doc:
        raise RegionsError(source, ["top level must be a mapping with a 'regions' list"])
    items = doc["regions"]
    if not isinstance(items, list) or not items:
        raise RegionsError(source, ["regions: must be a non-empty list"])
    defaults = doc.get("defaults") or {}
    if not isinstance(defaults, Mapping):
        problems.append("defaults: must be a mapping")
        defaults = {}

    regions: list[Region] = []
    seen: dict[str, int] = {}
    for i, raw in enumerate(items):
        where = f"regions[{i}]"
        if not isinstance(raw, Mapping):
            problems.append(f"{where}: must be a mapping, got {type(raw).__name__}")
            continue
        if isinstance(raw.get("id"), str):
            where = f"regions[{i}] ({raw['id']})"
        try:
            entry = RegionEntry.model_validate({**defaults, **raw}, context={"base_dir": base_dir})
        except ValidationError as e:
            problems.extend(where + p for p in _problems(e, RegionEntry))
            continue
        if entry.id in seen:
            problems.append(f"{where}.id: duplicate id {entry.id!r} (also regions[{seen[entry.id]}])")  # fmt: skip
            continue
        seen[entry.id] = i
        regions.append(entry.region())
    if problems:
        raise RegionsError(source, problems)
    return RegionsConfig(path=Path(source), regions=tuple(regions))


# ------------------------------------------------------------------ field validators' helpers


#: The five cron fields: (lowest, highest, names). Day of week 7 is Sunday too.
_CRON_FIELDS = (
    (0, 59, ()), (0, 23, ()), (1, 31, ()),
    (1, 12, ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")),
    (0, 7, ("sun", "mon", "tue", "wed", "thu", "fri", "sat")),
)  # fmt: skip
_CRON_ITEM = re.compile(r"^(\*|(\w+)(?:-(\w+))?)(?:/(\d+))?$")


def _valid_cron(cron: str) -> bool:
    """A five-field cron expression (lists, ranges, steps, month and day names), as the
    schedules take it; the library keeps no dependency on Dagster's private parser."""
    fields = cron.split()
    if len(fields) != 5:
        return False
    for text, (low, high, names) in zip(fields, _CRON_FIELDS, strict=True):

        def value(token: str, low: int = low, names: tuple[str, ...] = names) -> int | None:
            if token.isdigit():
                return int(token)
            name = token.lower()
            if name in names:
                return names.index(name) + (1 if low == 1 else 0)
            return None

        for item in text.split(","):
            m = _CRON_ITEM.match(item)
            if m is None or (m.group(4) is not None and int(m.group(4)) == 0):
                return False
            if m.group(1) == "*":
                continue
            bounds = [value(t) for t in (m.group(2), m.group(3)) if t is not None]
            if any(b is None or not low <= b <= high for b in bounds):
                return False
            if len(bounds) == 2 and bounds[0] > bounds[1]:  # type: ignore[operator]
                return False
    return True


def _parse_bbox(
    value: Any, where: str, problems: list[str]
) -> tuple[float, float, float, float] | None:
    if not isinstance(value, list | tuple) or len(value) != 4:
        problems.append(
            f"{where}: must be a list of 4 numbers [west, south, east, north], got {value!r}"
        )
        return None
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
        problems.append(f"{where}: all 4 values must be numbers, got {value!r}")
        return None
    w, s, e, n = (float(v) for v in value)
    bad = False
    for label, v in (("west", w), ("east", e)):
        if not -180 <= v <= 180:
            problems.append(f"{where}: {label} longitude {v} is out of range [-180, 180]")
            bad = True
    for label, v in (("south", s), ("north", n)):
        if not -90 <= v <= 90:
            problems.append(f"{where}: {label} latitude {v} is out of range [-90, 90]")
            bad = True
    if bad:
        return None
    if s >= n:
        problems.append(f"{where}: south ({s}) must be less than north ({n}); the box is empty")
        return None
    if w >= e:
        problems.append(
            f"{where}: west ({w}) must be less than east ({e}); the box is empty. "
            + ANTIMERIDIAN_ADVICE
        )
        return None
    return (w, s, e, n)


def _parse_geometry(
    value: Any, where: str, problems: list[str]
) -> tuple[tuple[float, float, float, float] | None, dict[str, Any] | None]:
    if isinstance(value, Mapping) and value.get("type") == "Feature":
        value = value.get("geometry")
    if not isinstance(value, Mapping) or value.get("type") not in ("Polygon", "MultiPolygon"):
        problems.append(f"{where}: must be a GeoJSON Polygon or MultiPolygon")
        return None, None
    try:
        geom = shapely.geometry.shape(value)
    except Exception as e:  # shapely raises several types for malformed coordinates
        problems.append(f"{where}: malformed coordinates ({e})")
        return None, None
    reason = shapely.is_valid_reason(geom)
    if geom.is_empty or shapely.make_valid(geom).area == 0:
        problems.append(f"{where}: the geometry is empty (it has no area)")
        return None, None
    west, south, east, north = geom.bounds
    if west < -180 or east > 180 or south < -90 or north > 90:
        problems.append(
            f"{where}: coordinates out of range (bounds {west}, {south}, {east}, {north}); "
            "use longitude, latitude in EPSG:4326"
        )
        return None, None
    if not geom.is_valid:
        problems.append(f"{where}: invalid geometry: {reason}")
        return None, None
    if east - west > 180:
        # Parts on both sides of longitude 180 (a two-part MultiPolygon for Fiji): its
        # bounds span the globe, so its UTM zone, grid and STAC bbox would be nonsense.
        problems.append(
            f"{where}: the geometry spans {east - west:.1f} degrees of longitude "
            f"({west} to {east}): it crosses the antimeridian. " + ANTIMERIDIAN_ADVICE
        )
        return None, None
    return (west, south, east, north), shapely.geometry.mapping(geom)


ANTIMERIDIAN_ADVICE = (
    "A region is gridded in one UTM zone and searched with one bbox, so an AOI across "
    "longitude 180 must be two regions, one on each side (say fiji-east with longitudes "
    "up to 180 and fiji-west from -180)."
)


def _parse_periods(value: Any, where: str, problems: list[str]) -> list[Period]:
    if not isinstance(value, list) or not value:
        problems.append(
            f"{where}: must be a non-empty list of years, quarters or date ranges, or "
            "open-ended as {from: 2019, every: year}"
        )
        return []
    out: list[Period] = []
    for j, item in enumerate(value):
        p = _parse_period(item, f"{where}[{j}]", problems)
        if p is not None:
            out.append(p)
    ids = [p.id for p in out]
    for pid in sorted({x for x in ids if ids.count(x) > 1}):
        problems.append(f"{where}: duplicate period {pid!r}")
    if len(out) == len(value) and out != sorted(out, key=lambda p: p.start):
        problems.append(f"{where}: periods must be listed in time order")
    return out


def parse_period(item: Any, where: str = "period") -> Period:
    """A period from its id (2021, 2021Q3); ``RegionsError`` naming ``where`` if it is not."""
    problems: list[str] = []
    period = _parse_period(item, where, problems)
    if period is None:
        raise RegionsError(where, problems)
    return period


def _parse_period(item: Any, where: str, problems: list[str]) -> Period | None:
    if isinstance(item, int) and not isinstance(item, bool):
        item = str(item)
    if isinstance(item, str):
        if (p := year_or_quarter(item)) is not None:
            if not 2015 <= p.start.year <= 2100:
                problems.append(f"{where}: year {p.start.year} is outside Sentinel-2's era (2015 on)")  # fmt: skip
                return None
            return p
        problems.append(
            f"{where}: {item!r} is not a period: use a year (2021), a quarter (2021Q3) or "
            "{id, start, end} with ISO dates"
        )
        return None
    if isinstance(item, Mapping):
        pid = item.get("id")
        if not isinstance(pid, str) or not _PERIOD_ID_RE.match(pid):
            problems.append(
                f"{where}.id: {pid!r} must be 1-32 letters, digits, '-' or '_' (it names a partition)"
            )
            return None
        start_d = _parse_date(item.get("start"), f"{where}.start", problems)
        end_d = _parse_date(item.get("end"), f"{where}.end", problems)
        if start_d is None or end_d is None:
            return None
        start, end = start_d, end_d
        if start > end:
            problems.append(f"{where}: start {start} is after end {end} (dates reversed?)")
            return None
        return Period(pid, start, end)
    problems.append(f"{where}: {item!r} is not a period")
    return None


def _parse_date(value: Any, where: str, problems: list[str]) -> dt.date | None:
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    if isinstance(value, str):
        try:
            return dt.date.fromisoformat(value)
        except ValueError:
            pass
    problems.append(f"{where}: {value!r} is not an ISO date (YYYY-MM-DD)")
    return None


def _parse_context(
    value: Any, where: str, problems: list[str], base_dir: Path | None
) -> tuple[dict[str, str], dict[str, dict[str, str]], dict[str, str]]:
    """Layer kind -> file, kind -> {role: column} for layers given as a mapping, and the
    grievance status values the file uses -> open | closed (``status_values``)."""
    if value is None:
        return {}, {}, {}
    if not isinstance(value, Mapping):
        problems.append(f"{where}: must be a mapping of layer kind to a file or {{file: ...}}")
        return {}, {}, {}
    out: dict[str, str] = {}
    fields: dict[str, dict[str, str]] = {}
    status_values: dict[str, str] = {}
    for kind, spec in value.items():
        if kind not in CONTEXT_KINDS:
            problems.append(
                f"{where}.{kind}: unknown layer kind (known: {', '.join(CONTEXT_KINDS)})"
            )
            continue
        path = spec
        if isinstance(spec, Mapping):
            path = spec.get("file")
            roles = CONTEXT_ROLES[kind]
            mapped: dict[str, str] = {}
            for role, column in spec.items():
                if role == "file":
                    continue
                if role == "status_values" and kind == "grievances":
                    status_values = _parse_status_values(column, f"{where}.{kind}.{role}", problems)  # fmt: skip
                    continue
                if role not in (*roles, "crs"):
                    extra = ", status_values" if kind == "grievances" else ""
                    problems.append(
                        f"{where}.{kind}.{role}: unknown field (known: file, crs, "
                        f"{', '.join(roles)}{extra})"
                    )
                elif not isinstance(column, str) or not column.strip():
                    problems.append(f"{where}.{kind}.{role}: must be a column name")
                else:
                    mapped[role] = column
            fields[kind] = mapped
        if not isinstance(path, str) or not path.strip():
            problems.append(f"{where}.{kind}: must be a file path (or {{file: path, ...}})")
            continue
        if path.startswith("embedded:"):
            rel = path.removeprefix("embedded:")
            if rel.startswith("/") or ".." in Path(rel).parts:
                problems.append(f"{where}.{kind}: {path!r} must stay inside the embedded world")
                continue
            out[kind] = path
            continue
        p = Path(path)
        if not p.is_absolute() and base_dir is not None:
            p = base_dir / p
        out[kind] = str(p)
    return out, fields, status_values


def _parse_status_values(value: Any, where: str, problems: list[str]) -> dict[str, str]:
    """``{value in the file: open | closed}``; keys are matched as normalised text."""
    if not isinstance(value, Mapping) or not value:
        problems.append(f"{where}: must map the file's status values to open or closed, e.g. {{'en tramite': open}}")  # fmt: skip
        return {}
    out: dict[str, str] = {}
    for raw, state in value.items():
        if not isinstance(raw, str) or not raw.strip():
            problems.append(f"{where}: {raw!r} is not a status value (text)")
        elif state not in GRIEVANCE_STATES:
            problems.append(f"{where}.{raw}: {state!r} must be one of {', '.join(GRIEVANCE_STATES)}")  # fmt: skip
        else:
            out[raw] = str(state)
    return out
