"""Regions configuration: the YAML file that says where and when asmwatch looks.

First step of the flow: everything downstream (the STAC search, the composite grid, the
partitions) is driven by the typed ``Region`` objects built here. Loading collects every
problem in the file, each naming the field (``regions[2].aoi.bbox``) and what is wrong,
so ``asmwatch validate`` can print them all at once.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import shapely
import shapely.geometry
import yaml

DEFAULT_REGIONS_FILE = "regions.yaml"

Source = Literal["earth-search", "planetary-computer", "embedded"]
KNOWN_SOURCES: tuple[str, ...] = ("earth-search", "planetary-computer", "embedded")

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
CLOUD_MASKS: tuple[str, ...] = ("scl", "scl+s2cloudless")

#: Context-layer kinds a region may bring (see docs/data-dictionary.md).
CONTEXT_KINDS: tuple[str, ...] = (
    "protected_areas",
    "indigenous_lands",
    "concessions",
    "settlements",
    "rivers",
    "grievances",
    "detections",
    "mining_labels",  # polygons of mining (e.g. by period) to train and evaluate on
)

#: Attribute roles a context layer's columns can be mapped to (regions file:
#: ``context: {kind: {file: ..., <role>: <column>}}``); see pipelines/context.py.
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

# Ids become directory names, partition keys and SQL literals in views: keep them to a
# safe alphabet so no id can escape the data root or break a statement.
_ID_RE = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
_PERIOD_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$")
_YEAR_RE = re.compile(r"^(\d{4})$")
_QUARTER_RE = re.compile(r"^(\d{4})Q([1-4])$")


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


PERIOD_STEPS = ("year", "quarter")


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

    every: str  # year | quarter
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


@dataclass(frozen=True)
class EmbeddedSpec:
    """How the embedded Sentinel-2 simulator builds this region's world."""

    seed: int = 42
    scenes_per_period: int = 4
    growth_factor: float = 1.5
    reprocessed_twins: bool = True


DETECTION_MODES = ("presence", "new")


@dataclass(frozen=True)
class RefreshSpec:
    """When Dagster refreshes a region (schedule ``refresh_<id>``, sensor ``new_scenes``).

    ``cron``: the schedule's cadence (five-field cron, in ``timezone``); empty: no
    schedule. ``watch_scenes``: the ``new_scenes`` sensor looks for scenes of the current
    period that were not in its last run. ``period``: ``current`` refreshes the period
    containing today (else the latest one), ``all`` every period.
    """

    cron: str = ""
    timezone: str = "UTC"
    watch_scenes: bool = True
    period: str = "current"


REFRESH_PERIODS = ("current", "all")


@dataclass(frozen=True)
class DetectionsSpec:
    """A file of external ASM polygons that replaces the model's sites for a region.

    ``mode``: ``presence`` (each feature is mining present in its period) or ``new``
    (each feature is mining first seen in its period, as Amazon Mining Watch's "new
    mining" layers: a period's sites are every feature of that period or earlier).
    """

    path: str
    period_field: str = "period"
    mapped_area_field: str | None = None  # the provider's own mined area (ha), if any
    period: str | None = None  # one period for every feature (a file with no period column)
    id_field: str | None = None
    mode: str = "presence"


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
    """Validate an already-parsed regions document."""
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
        merged = {**defaults, **raw}
        rid = raw.get("id")
        if isinstance(rid, str):
            where = f"regions[{i}] ({rid})"
        region = _parse_region(merged, where, problems, base_dir)
        if region is None:
            continue
        if region.id in seen:
            problems.append(
                f"{where}.id: duplicate id {region.id!r} (also regions[{seen[region.id]}])"
            )
            continue
        seen[region.id] = i
        regions.append(region)
    if problems:
        raise RegionsError(source, problems)
    return RegionsConfig(path=Path(source), regions=tuple(regions))


def _parse_region(
    raw: Mapping[str, Any], where: str, problems: list[str], base_dir: Path | None
) -> Region | None:
    n_before = len(problems)
    known = {
        "id", "name", "description", "aoi", "periods", "source", "collection",
        "max_cloud_cover", "context", "embedded", "min_valid_fraction", "cloud_mask",
        "l1c_collection", "detections", "refresh",
    }  # fmt: skip
    for key in raw:
        if key not in known:
            problems.append(f"{where}.{key}: unknown field (known: {', '.join(sorted(known))})")

    rid = raw.get("id")
    if not isinstance(rid, str) or not rid:
        problems.append(f"{where}.id: missing or not a string")
    elif not _ID_RE.match(rid):
        problems.append(
            f"{where}.id: {rid!r} is not a safe id: use 1-63 lowercase letters, digits, '-' "
            "or '_', starting with a letter (ids name folders and SQL values, so '/', '..', "
            "quotes and spaces are refused)"
        )
    name = raw.get("name", rid)
    if not isinstance(name, str) or not name.strip():
        problems.append(f"{where}.name: must be a non-empty string")

    bbox, geometry = _parse_aoi(raw.get("aoi"), f"{where}.aoi", problems)
    series = None
    if isinstance(raw.get("periods"), Mapping):
        series = _parse_series(raw["periods"], f"{where}.periods", problems)
        periods = list(series.until(utc_today())) if series is not None else []
    else:
        periods = _parse_periods(raw.get("periods"), f"{where}.periods", problems)

    source = raw.get("source", "earth-search")
    if not isinstance(source, str) or not (
        source in KNOWN_SOURCES or re.match(r"^https?://[^\s/$.?#][^\s]*$", source)
    ):
        problems.append(
            f"{where}.source: unknown source {source!r}: use one of "
            f"{', '.join(KNOWN_SOURCES)} or an http(s) URL of a STAC API"
        )
    collection = raw.get("collection", DEFAULT_COLLECTION)
    if not isinstance(collection, str) or not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*$", collection):
        problems.append(f"{where}.collection: {collection!r} is not a valid collection id")

    mcc = raw.get("max_cloud_cover", 60)
    if isinstance(mcc, bool) or not isinstance(mcc, int | float) or not 0 <= mcc <= 100:
        problems.append(f"{where}.max_cloud_cover: {mcc!r} must be a number from 0 to 100")
    mvf = raw.get("min_valid_fraction", 0.5)
    if isinstance(mvf, bool) or not isinstance(mvf, int | float) or not 0 <= mvf <= 1:
        problems.append(f"{where}.min_valid_fraction: {mvf!r} must be a number from 0 to 1")

    cloud_mask = raw.get("cloud_mask", "scl")
    if cloud_mask not in CLOUD_MASKS:
        problems.append(
            f"{where}.cloud_mask: unknown cloud mask {cloud_mask!r}: use one of "
            f"{', '.join(CLOUD_MASKS)}"
        )
    l1c = raw.get("l1c_collection", DEFAULT_L1C_COLLECTION)
    if not isinstance(l1c, str) or not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*$", l1c):
        problems.append(f"{where}.l1c_collection: {l1c!r} is not a valid collection id")
    if cloud_mask == "scl+s2cloudless" and source == "planetary-computer":
        problems.append(
            f"{where}.cloud_mask: s2cloudless needs Sentinel-2 L1C scenes, which Planetary "
            "Computer does not serve; use source earth-search (or a STAC API with L1C)"
        )

    context, context_fields, status_values = _parse_context(
        raw.get("context"), f"{where}.context", problems, base_dir
    )
    embedded = _parse_embedded(raw.get("embedded"), f"{where}.embedded", problems)
    detections = _parse_detections(raw.get("detections"), f"{where}.detections", problems, base_dir)
    refresh = _parse_refresh(raw.get("refresh"), f"{where}.refresh", problems)
    if source == "embedded" and embedded is None and raw.get("embedded") is None:
        embedded = EmbeddedSpec()

    if len(problems) > n_before:
        return None
    assert isinstance(rid, str) and bbox is not None and geometry is not None
    return Region(
        id=rid,
        name=str(name),
        description=str(raw.get("description", "")),
        bbox=bbox,
        geometry=geometry,
        periods=tuple(periods),
        source=str(source),
        collection=str(collection),
        max_cloud_cover=float(mcc),
        context=context,
        context_fields=context_fields,
        status_values=status_values,
        embedded=embedded,
        min_valid_fraction=float(mvf),
        cloud_mask=str(cloud_mask),
        l1c_collection=str(l1c),
        detections=detections,
        refresh=refresh or RefreshSpec(),
        series=series,
    )


def _parse_refresh(value: Any, where: str, problems: list[str]) -> RefreshSpec | None:
    if value is None:
        return RefreshSpec()
    if not isinstance(value, Mapping):
        problems.append(f"{where}: must be a mapping with cron, timezone, watch_scenes, period")
        return None
    n = len(problems)
    for key in value:
        if key not in ("cron", "timezone", "watch_scenes", "period"):
            problems.append(f"{where}.{key}: unknown field (known: cron, period, timezone, watch_scenes)")  # fmt: skip
    cron = value.get("cron", "")
    if not isinstance(cron, str) or (cron and not _valid_cron(cron)):
        problems.append(
            f"{where}.cron: {cron!r} is not a five-field cron expression "
            "(minute hour day-of-month month day-of-week, e.g. '0 6 * * 1')"
        )
    tz = value.get("timezone", "UTC")
    try:
        import zoneinfo

        zoneinfo.ZoneInfo(str(tz))
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        problems.append(f"{where}.timezone: unknown time zone {tz!r} (an IANA name like 'UTC', 'America/Lima')")  # fmt: skip
    watch = value.get("watch_scenes", True)
    if not isinstance(watch, bool):
        problems.append(f"{where}.watch_scenes: {watch!r} must be true or false")
    period = value.get("period", "current")
    if period not in REFRESH_PERIODS:
        problems.append(f"{where}.period: {period!r}: use one of {', '.join(REFRESH_PERIODS)}")
    if len(problems) > n:
        return None
    return RefreshSpec(str(cron), str(tz), bool(watch), str(period))


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


def _parse_aoi(
    aoi: Any, where: str, problems: list[str]
) -> tuple[tuple[float, float, float, float] | None, dict[str, Any] | None]:
    if not isinstance(aoi, Mapping) or not ({"bbox", "geometry"} & set(aoi)):
        problems.append(f"{where}: missing; give 'bbox: [west, south, east, north]' or 'geometry'")
        return None, None
    if "bbox" in aoi and "geometry" in aoi:
        problems.append(f"{where}: give either bbox or geometry, not both")
        return None, None
    if "bbox" in aoi:
        bbox = _parse_bbox(aoi["bbox"], f"{where}.bbox", problems)
        if bbox is None:
            return None, None
        return bbox, shapely.geometry.mapping(shapely.geometry.box(*bbox))
    return _parse_geometry(aoi["geometry"], f"{where}.geometry", problems)


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


def _parse_series(value: Mapping[str, Any], where: str, problems: list[str]) -> PeriodSeries | None:
    """``{from: 2019, every: year}`` or ``{from: 2021Q1, every: quarter, to: 2024Q4}``."""
    n = len(problems)
    for key in value:
        if key not in ("from", "every", "to"):
            problems.append(f"{where}.{key}: unknown field (open-ended periods: from, every, to)")
    every = value.get("every")
    if every not in PERIOD_STEPS:
        problems.append(f"{where}.every: {every!r}: use one of {', '.join(PERIOD_STEPS)}")
        return None
    ends: list[Period | None] = []
    for key in ("from", "to"):
        item = value.get(key)
        if item is None:
            if key == "from":
                problems.append(f"{where}.from: missing; give the first {every} (e.g. {'2019' if every == 'year' else '2019Q1'})")  # fmt: skip
            ends.append(None)
            continue
        if isinstance(item, int) and not isinstance(item, bool):
            item = str(item)
        if not isinstance(item, str):
            problems.append(f"{where}.{key}: {item!r} is not a {every}")
            ends.append(None)
            continue
        p = _parse_period(item, f"{where}.{key}", problems)
        if p is None:
            ends.append(None)
            continue
        if (every == "year") != ("Q" not in p.id):
            problems.append(f"{where}.{key}: {p.id!r} is not a {every} (every: {every})")
            ends.append(None)
            continue
        ends.append(p)
    first, last = ends
    if first is not None and last is not None and last.start < first.start:
        problems.append(f"{where}: to {last.id} is before from {first.id}")
    if len(problems) > n or first is None:
        return None
    return PeriodSeries(str(every), first, last)


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


#: What a grievance's status may mean: open grievances count in the risk score.
GRIEVANCE_STATES = ("open", "closed")


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


def _parse_detections(
    value: Any, where: str, problems: list[str], base_dir: Path | None
) -> DetectionsSpec | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        problems.append(f"{where}: must be a mapping with at least 'file'")
        return None
    known = {"file", "period_field", "period", "mapped_area_field", "id_field", "mode"}
    n_before = len(problems)
    for key in value:
        if key not in known:
            problems.append(f"{where}.{key}: unknown field (known: {', '.join(sorted(known))})")
    path = value.get("file")
    if not isinstance(path, str) or not path.strip():
        problems.append(f"{where}.file: missing or not a file path")
    for key in ("period_field", "mapped_area_field", "id_field"):
        v = value.get(key)
        if v is not None and (not isinstance(v, str) or not v.strip()):
            problems.append(f"{where}.{key}: must be a column name")
    constant = value.get("period")
    if constant is not None:
        constant = str(constant)
        if "period_field" in value:
            problems.append(
                f"{where}: give either period (one period for every feature) or "
                "period_field (a column of the file), not both"
            )
        try:
            parse_period(constant, f"{where}.period")
        except RegionsError as e:
            problems.extend(e.problems)
    mode = value.get("mode", "presence")
    if mode not in DETECTION_MODES:
        problems.append(f"{where}.mode: {mode!r} must be one of {', '.join(DETECTION_MODES)}")
    if len(problems) > n_before:
        return None
    assert isinstance(path, str)
    p = Path(path)
    if not p.is_absolute() and base_dir is not None:
        p = base_dir / p
    return DetectionsSpec(
        path=str(p),
        period_field=str(value.get("period_field", "period")),
        period=constant,
        mapped_area_field=value.get("mapped_area_field"),
        id_field=value.get("id_field"),
        mode=str(mode),
    )


def _parse_embedded(value: Any, where: str, problems: list[str]) -> EmbeddedSpec | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        problems.append(f"{where}: must be a mapping")
        return None
    spec = EmbeddedSpec()
    kwargs: dict[str, Any] = {}
    limits: dict[str, tuple[type, float, float]] = {
        "seed": (int, 0, 2**32 - 1),
        "scenes_per_period": (int, 1, 24),
        "growth_factor": (float, 1.0, 10.0),
    }
    for key, raw in value.items():
        if key == "reprocessed_twins":
            if not isinstance(raw, bool):
                problems.append(f"{where}.{key}: must be true or false")
            else:
                kwargs[key] = raw
            continue
        if key not in limits:
            problems.append(
                f"{where}.{key}: unknown field (known: {', '.join([*limits, 'reprocessed_twins'])})"
            )
            continue
        typ, lo, hi = limits[key]
        ok_type = isinstance(raw, int | float) and not isinstance(raw, bool)
        if typ is int:
            ok_type = isinstance(raw, int) and not isinstance(raw, bool)
        if not ok_type or not lo <= raw <= hi:
            problems.append(
                f"{where}.{key}: {raw!r} must be a {typ.__name__} from {lo:g} to {hi:g}"
            )
            continue
        kwargs[key] = typ(raw)
    return EmbeddedSpec(**{**spec.__dict__, **kwargs})
