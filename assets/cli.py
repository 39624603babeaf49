"""The ``asmwatch`` command: ``run``, ``demo``, ``backfill``, ``validate``, ``probe``,
``ui``, ``sql``, ``doctor``.

It lives with the Dagster layer (assets/): ``run``, ``demo`` and ``backfill`` build the
definitions (``assets.definitions.build_definitions``) for the data root and regions
file they are given and materialise a plan of steps (``assets.runner``) in-process,
recorded in the Dagster instance under the data root so ``asmwatch ui`` shows the runs.
``asmwatch demo`` is what ``make demo`` runs: every asset of the embedded demo region.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from pipelines.infra.storage import data_root
from pipelines.regions import RegionsError, load_regions, regions_path


def _cmd_validate(args: argparse.Namespace) -> int:
    path = Path(args.file) if args.file else regions_path()
    try:
        config = load_regions(path)
    except RegionsError as e:
        print(f"{e.source}: {len(e.problems)} problem(s)", file=sys.stderr)
        for p in e.problems:
            print(f"  - {p}", file=sys.stderr)
        return 1
    print(f"{path}: OK, {len(config.regions)} region(s)")
    for r in config.regions:
        periods = ", ".join(p.id for p in r.periods)
        print(f"  {r.id:24s} {r.source:18s} reports in {r.language}  periods {periods}")
        for kind, layer in r.context.items():
            if not layer.startswith("embedded:") and not Path(layer).exists():
                print(f"    warning: context layer {kind} not found: {layer}")
    return 0


DAGSTER_YAML = """# Written by asmwatch (assets/cli.py); edit freely, it is not overwritten.
telemetry:
  enabled: false
# Run retries: a run that dies (lost worker, killed process) is retried up to twice.
# Jobs tag dagster/retry_on_asset_or_op_failure=false, so failing steps are not re-run
# this way; they follow their own retry policies.
run_retries:
  enabled: true
  max_retries: 2
  # A failed step (bad input, a full disk) is not a crashed run: never re-run for it,
  # also for runs the UI launches without the jobs' tags.
  retry_on_asset_or_op_failure: false
# Run monitoring (needs the daemon, which `asmwatch ui` starts): runs stuck starting or
# cancelling, or past a dagster/max_runtime tag, are failed. (The default run launcher
# cannot see a dead run worker; runs of `asmwatch demo` and `asmwatch backfill` run in
# their own process, and the next asmwatch command marks theirs failed.)
run_monitoring:
  enabled: true
  poll_interval_seconds: 30
"""


def use_dagster_home(root: Path) -> Path:
    """Set ``DAGSTER_HOME`` (default ``<root>/dagster_home``) and write its dagster.yaml.

    Dagster finds dagster.yaml by a glob of ``$DAGSTER_HOME/dagster.yaml``: in a folder
    named ``data [ab]`` it finds nothing and silently runs on defaults (no run retries
    settings, telemetry on). Such a home is reached through a symlink with a plain path
    in the temporary folder instead, said in one line.
    """
    import hashlib
    import tempfile

    home = Path(os.environ.get("DAGSTER_HOME") or root / "dagster_home")
    ensure_dagster_home(home)
    if any(c in str(home) for c in "[]*?"):
        digest = hashlib.sha1(str(home.resolve()).encode()).hexdigest()[:12]
        link = Path(tempfile.gettempdir()) / f"asmwatch-dagster-home-{digest}"
        if not (link.is_symlink() and link.resolve() == home.resolve()):
            link.unlink(missing_ok=True)
            link.symlink_to(home.resolve(), target_is_directory=True)
        print(f"DAGSTER_HOME {home} has glob characters Dagster cannot read it by; using {link} -> it", file=sys.stderr)  # fmt: skip
        home = link
    os.environ["DAGSTER_HOME"] = str(home)
    return home


WORKSPACE_YAML = """# Written by asmwatch (assets/cli.py) at each `asmwatch ui`: the installed package's
# code location, so the UI works from any folder and from a non-editable install.
load_from:
  - python_module:
      module_name: assets.location
      location_name: asmwatch
"""


def write_workspace(home: Path) -> Path:
    """``$DAGSTER_HOME/workspace.yaml``, naming the installed code location."""
    home.mkdir(parents=True, exist_ok=True)
    path = home / "workspace.yaml"
    if not path.exists() or path.read_text() != WORKSPACE_YAML:
        path.write_text(WORKSPACE_YAML)
    return path


def ensure_dagster_home(home: Path) -> Path:
    """Create DAGSTER_HOME with asmwatch's dagster.yaml unless one is there."""
    home.mkdir(parents=True, exist_ok=True)
    cfg = home / "dagster.yaml"
    if not cfg.exists():
        cfg.write_text(DAGSTER_YAML)
    return cfg


def _cmd_ui(args: argparse.Namespace) -> int:
    """``dagster dev`` on 127.0.0.1 with DAGSTER_HOME and the code location in it."""
    root = data_root(args.data)
    os.environ["ASMWATCH_DATA"] = str(root)  # for the code location's entry point
    regions_file = Path(args.regions).resolve() if args.regions else regions_path().resolve()
    os.environ["ASMWATCH_REGIONS"] = str(regions_file)
    config = load_regions(regions_file)
    use_dagster_home(root)
    import dagster as dg

    from assets.runs import fail_dead_runs

    instance = dg.DagsterInstance.get()
    fail_dead_runs(instance)
    _sync_partitions(instance, config)  # the region_partitions sensor keeps them so
    workspace = write_workspace(Path(os.environ["DAGSTER_HOME"]))
    cmd = [str(Path(sys.executable).parent / "dagster"), "dev", "-w", str(workspace),
           "-h", "127.0.0.1", "-p", str(args.port)]  # fmt: skip
    print(f"asmwatch ui: {' '.join(cmd)} (DAGSTER_HOME={os.environ['DAGSTER_HOME']})", flush=True)
    os.execv(cmd[0], cmd)
    return 0  # not reached


def _sync_partitions(instance: Any, config: Any) -> None:
    """Add the regions file's partitions to the instance; warn about ones it dropped."""
    from assets.partitions import sync_partitions

    done = sync_partitions(instance, config)
    if done.added:
        print(f"  partitions: added {len(done.added)} from {config.path}")
    if (stale := done.stale_message(config)) is not None:
        print(f"warning: {stale}", file=sys.stderr)


def _run_region(
    args: argparse.Namespace,
    region_id: str | None,
    *,
    select: list[str] | None = None,
    start: str | None = None,
) -> tuple[int, Any]:
    """Plan and run the selection for the region's periods; (exit code, context)."""
    root = data_root(args.data)
    regions_file = Path(args.regions).resolve() if args.regions else regions_path().resolve()
    use_dagster_home(root)
    config = load_regions(regions_file)
    if region_id is None:  # demo: the first embedded region
        embedded = [r for r in config.regions if r.source == "embedded"]
        if not embedded:
            print("no region with source: embedded in the regions file", file=sys.stderr)
            return 2, None
        region_id = embedded[0].id
    try:
        region = config.get(region_id)
    except KeyError as e:
        print(str(e.args[0]), file=sys.stderr)
        return 2, None

    import dagster as dg

    from assets.definitions import PC_KEY_VAR, LocationConfig, build_definitions
    from assets.runner import PlanError, execute, plan
    from assets.runs import fail_dead_runs, run_tags

    defs = build_definitions(
        LocationConfig(root, regions_file, pc_key_from_env=bool(os.environ.get(PC_KEY_VAR)))
    )
    wanted = [p.strip() for chunk in (args.periods or []) for p in chunk.split(",") if p.strip()]
    try:
        the_plan = plan(defs, region, wanted, select, start)
    except PlanError as e:
        print(f"asmwatch {args.cmd}: {e}", file=sys.stderr)
        return 2, None
    steps = ", ".join(dict.fromkeys(a for s in the_plan.steps for a in s.assets))
    print(
        f"asmwatch {args.cmd}: region {region.id} ({region.name}), periods "
        f"{', '.join(p.id for p in the_plan.periods)}, data root {root}, regions file {regions_file}\n  assets: {steps}"
    )
    instance = dg.DagsterInstance.get()
    fail_dead_runs(instance)
    _sync_partitions(instance, config)
    train_cfg = {"max_epochs": args.train_epochs} if args.train_epochs else {}
    t0 = time.monotonic()
    outcome = execute(
        defs, instance, the_plan,
        tags=run_tags(),
        run_config={"loggers": {"console": {"config": {"log_level": "INFO"}}}},
        job_config={"train_model": {"ops": {"mining_model": {"config": train_cfg}}}},
        say=lambda m: print(m, flush=True),
        warn=lambda m: print(m, file=sys.stderr, flush=True),
    )  # fmt: skip
    c = outcome.checks
    print(f"  asset checks: {c['passed']} passed, {c['warning']} warning(s), {c['failed']} failed")
    if outcome.failed is not None:
        print(f"asmwatch {args.cmd}: FAILED at {outcome.failed}", file=sys.stderr)
        return 1, None
    print(f"done in {time.monotonic() - t0:.1f} s")
    return 0, (root, region, the_plan, outcome)


def _cmd_run(args: argparse.Namespace) -> int:
    select = [a.strip() for a in args.select.split(",") if a.strip()] if args.select else None
    code, _ = _run_region(args, args.region, select=select, start=args.start)
    return code


def _cmd_demo(args: argparse.Namespace) -> int:
    """Every asset of a region (the first embedded one for ``demo``), then where it all is."""
    code, done = _run_region(args, getattr(args, "region", None))
    if code != 0:
        return code
    root, region, the_plan, outcome = done
    periods = the_plan.periods
    from pipelines.infra.layout import composite_path, scenes_path

    ran = {a for step in the_plan.steps for a in step.assets}
    rep = outcome.meta("region_report", region.id)
    print("\nResults:")
    if "scenes" in ran:
        print(f"  scenes (stac-geoparquet): {root / 'scenes' / region.id}/<period>.parquet")
        for period in periods:
            print(f"    {scenes_path(root, region.id, period.id)}")
    if "composite" in ran:
        print(f"  composites (COG):         {root / 'composite' / region.id}/<period>.tif")
        for period in periods:
            print(f"    {composite_path(root, region.id, period.id)}")
    if "mining_probability" in ran:
        print(f"  mining probability (COG): {root / 'probability' / region.id}/<period>.tif")
    if "mining_model" in ran:
        print(f"  models (registry):        {root / 'models'}  (view: models)")
    print(f"  ASM sites (GeoParquet):   {root / 'sites' / region.id}/<period>.parquet  (view: asm_sites)")  # fmt: skip
    print(f"  ASM change (GeoParquet):  {root / 'change' / region.id}/<period>.parquet  (views: asm_change, region_summary)")  # fmt: skip
    print(f"  context layers:           {root / 'context' / region.id}/<layer>.parquet  (views: protected_areas, indigenous_lands, concessions, settlements, rivers, grievances)")  # fmt: skip
    print(f"  risk tables (GeoParquet): {root / 'risk'}/<table>/{region.id}/<period>.parquet  (views: concession_risk, protected_area_pressure, hotspots, alerts)")  # fmt: skip
    print(f"  DuckDB catalog:           {root / 'asmwatch.duckdb'}  (views: scenes, models, asm_sites, asm_change, region_summary, the risk tables and the context layers)")  # fmt: skip
    if region.source == "embedded":
        print(f"  embedded world:           {root / 'embedded' / region.id}  (COGs, STAC items, truth masks, context layers)")  # fmt: skip
    print(f"  Dagster runs:             {os.environ['DAGSTER_HOME']}  (open with `asmwatch ui`)")
    _print_summary(root, region.id)
    _print_risk(root, region.id, periods[-1].id)
    print("\nReports (open in a browser; they work offline):")
    print(f"  region report:  {rep['report']}")
    print(f"  web map:        {rep['web_map']}")
    print(f"  expansion map:  {rep['expansion_map']}")
    print("\nQuery it:")
    print(
        f"  .venv/bin/asmwatch sql \"SELECT period, count(*) AS scenes, round(avg(cloud_cover), 1) AS cloud FROM scenes WHERE region = '{region.id}' GROUP BY period ORDER BY period\""
    )
    print(
        f"  .venv/bin/asmwatch sql \"SELECT period, kind, round(sum(area_ha), 1) AS ha FROM asm_change WHERE region = '{region.id}' GROUP BY ALL ORDER BY ALL\""
    )
    return 0


def _query(root: Path, sql: str, params: list[Any]) -> list[Any]:
    """Rows of one bound query on a read-only connection to the catalog."""
    from pipelines.stages.catalog import open_catalog

    con = open_catalog(root, say=lambda m: print(m, file=sys.stderr))
    try:
        return con.execute(sql, params).fetchall()
    finally:
        con.close()


def _print_risk(root: Path, region_id: str, period_id: str) -> None:
    """The riskiest concessions and the most severe alerts of the latest period."""

    top = _query(
        root,
        "SELECT concession_id, name, score, band, score_inside, score_proximity, score_new, "
        "score_growth, score_people, score_grievances FROM concession_risk "
        "WHERE region = ? AND period = ? ORDER BY score DESC LIMIT 5",
        [region_id, period_id],
    )
    warned = _query(
        root,
        "SELECT alert_ref, severity, area_ha, summary FROM alerts "
        "WHERE region = ? AND period = ? ORDER BY rank LIMIT 8",
        [region_id, period_id],
    )
    print(
        f"\nConcession risk {period_id} (score = inside + proximity + new + growth + people + grievances):"
    )
    for cid, name, score, band, *parts in top:
        print(
            f"  {cid:10} {name[:28]:28} {score:5.1f} {band:8} = "
            + " + ".join(f"{p:.1f}" for p in parts)
        )
    print(f"Alerts {period_id}:" + ("" if warned else " none"))
    for ref, severity, area, what in warned:
        print(f"  {ref} {severity:8} {area:7.2f} ha  {what[:110]}")


def _print_summary(root: Path, region_id: str) -> None:
    """The region_summary rows of ``region_id``: area, change and growth per period."""
    rows = _query(
        root,
        "SELECT period, mining_ha, new_ha + expanded_ha, revegetating_ha, abandoned_ha, "
        "growth_vs_previous, growth_vs_first FROM region_summary WHERE region = ? "
        "ORDER BY period_start",
        [region_id],
    )
    print("\nSummary (region_summary):")
    print(
        f"  {'period':8} {'mining ha':>10} {'new ha':>8} {'reveg ha':>9} {'aband ha':>9} {'x prev':>7} {'x first':>8}"
    )

    def fmt(v: float | None) -> str:
        return f"{v:.3f}" if v is not None else "-"

    for period, mining, new, reveg, aband, gp, gf in rows:
        print(
            f"  {period:8} {mining:10.1f} {new:8.1f} {reveg:9.1f} {aband:9.1f} {fmt(gp):>7} {fmt(gf):>8}"
        )


def _cmd_probe(args: argparse.Namespace) -> int:
    """Search one period of a region and read-check its clearest scenes."""
    from pipelines.infra.probe import probe
    from pipelines.stages.stac.search import StacSearchError
    from pipelines.stages.stac.signing import SigningError

    config = load_regions(Path(args.regions) if args.regions else None)
    try:
        region = config.get(args.region)
        period = region.period(args.period) if args.period else region.periods[-1]
    except KeyError as e:
        print(f"asmwatch probe: {e.args[0]}", file=sys.stderr)
        return 2
    server = None
    if region.source == "embedded":
        from pipelines.embedded.source import start_server

        server = start_server(data_root(args.data), region, say=print)
        url = server.url
    else:
        assert region.stac_url is not None
        url = region.stac_url
    try:
        report = probe(url, region, period, scenes=args.scenes, progress=print)
    except (StacSearchError, SigningError) as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    finally:
        if server is not None:
            server.stop()
    print("\n".join(report.lines()))
    return 0 if report.ok else 1


def _cmd_doctor(args: argparse.Namespace) -> int:
    """Check every file the catalog and the recorded runs expect; say what to re-run."""
    from ml import registry
    from pipelines.infra.integrity import doctor, removed_region_files
    from pipelines.stages.catalog import refresh_views

    root = data_root(args.data)
    print(f"asmwatch doctor: data root {root}")
    recorded: list[tuple[str, str, str]] = []
    stale: list[str] = []
    removed = 0
    try:
        config = load_regions(args.regions)
    except RegionsError as e:
        print(f"  warning: the regions file cannot be read, so regions removed from it are not checked: {e.problems[0]}")  # fmt: skip
        config = None
    home = Path(os.environ.get("DAGSTER_HOME") or root / "dagster_home")
    if (home / "dagster.yaml").exists() or (home / "storage").exists():
        home = use_dagster_home(root)
        import dagster as dg

        from assets.doctor import recorded_files
        from assets.runs import fail_dead_runs

        instance = dg.DagsterInstance.get()
        fail_dead_runs(instance)
        recorded = list(recorded_files(instance))
        print(f"  Dagster instance {home}: {len(recorded)} file(s) recorded as written")
        if config is not None:
            from assets.partitions import stale_partitions

            stale = stale_partitions(instance, config)
            for stale_key in stale:
                print(f"  partition {stale_key}: in the Dagster instance, not in {config.path} (no longer refreshed)")  # fmt: skip
    else:
        print(f"  no Dagster instance at {home}: checking the files only")
    if config is not None:
        for region_id, files in removed_region_files(root, config.ids).items():
            removed += len(files)
            print(
                f"  region {region_id}: {len(files)} file(s) under {root}, not in "
                f"{config.path}; left out of the catalog: "
                + ", ".join(files[:5])
                + (" ..." if len(files) > 5 else "")
            )
    if args.fix:
        print(f"  --fix: rebuilding the model registry table ({len(registry.rebuild(root))} model(s)) and the catalog")  # fmt: skip
        refresh_views(root, say=lambda m: print(f"  {m}"), regions=config.ids if config else None)
    report = doctor(root, deep=not args.quick, recorded=recorded)
    for note in report.notes:
        print(f"  note: {note}")
    if report.ok:
        print(f"OK: {report.checked} file(s) checked, none missing or damaged")
        if stale or removed:
            print(f"  ({len(stale)} partition(s) and {removed} file(s) of regions not in the regions file, above)")  # fmt: skip
        return 0
    print(f"{len(report.findings)} problem(s) in {report.checked} file(s) checked:")
    for f in report.findings:
        print(f"  {f.path}: {f.problem}")
    todo = report.rematerialise()
    if todo:
        workspace = write_workspace(Path(os.environ.get("DAGSTER_HOME") or root / "dagster_home"))
        print("Re-materialise (in the UI, or from a shell):")
        for asset, key in todo:
            part = f" --partition '{key}'" if key else ""
            print(f"  {asset} {key or ''}".rstrip())
            print(f"    dagster asset materialize -w {workspace} --select {asset}{part}")
    return 1


def _cmd_sql(args: argparse.Namespace) -> int:
    """A query against the catalog: read-only, no file access outside the data root.

    Bad SQL gets one line naming the problem and exit 2 (no traceback); ``--output``
    writes csv, json lines or Parquet atomically (a failed query leaves no file)."""
    import duckdb

    from pipelines.infra.errors import first_line
    from pipelines.stages.catalog import (
        AnalystQueryError,
        CatalogError,
        connect_analyst,
        run_analyst_query,
    )

    fmt = "table" if args.format == "box" else args.format
    if fmt == "parquet" and not args.output:
        print("asmwatch sql: --format parquet writes a file: give --output FILE", file=sys.stderr)
        return 2
    if fmt == "table" and args.output:
        print("asmwatch sql: --output takes --format csv, json or parquet", file=sys.stderr)
        return 2
    max_rows = args.max_rows if args.max_rows is not None else (50 if fmt == "table" else 0)
    root = data_root(args.data)
    if not root.is_dir():
        print(f"no data root at {root}: run `make demo` or materialise an asset first", file=sys.stderr)  # fmt: skip
        return 2
    try:
        con = connect_analyst(root, say=lambda m: print(m, file=sys.stderr))
    except CatalogError as e:
        print(f"asmwatch sql: {e}", file=sys.stderr)
        return 2
    try:
        rel = run_analyst_query(con, args.query)
        if rel is None:
            return 0
        if fmt == "table":
            rel.show(max_rows=max_rows or 10**9, max_width=200)
            return 0
        if max_rows > 0:
            rel = rel.limit(max_rows)
        if args.output:
            rows = _write_query(rel, fmt, Path(args.output))
            print(f"wrote {rows} rows to {args.output}", file=sys.stderr)
        else:
            _print_query(rel, fmt, sys.stdout)
    except AnalystQueryError as e:
        print(f"asmwatch sql: {e}", file=sys.stderr)
        return 2
    except duckdb.Error as e:
        print(f"asmwatch sql: {first_line(e)}", file=sys.stderr)
        return 2
    finally:
        con.close()
    return 0


def _print_query(rel: Any, fmt: str, out: Any) -> int:
    """A query's rows as CSV (with a header) or JSON lines on ``out``; the row count."""
    import csv
    import json

    n = 0
    writer = csv.writer(out) if fmt == "csv" else None
    if writer is not None:
        writer.writerow(rel.columns)
    while batch := rel.fetchmany(10_000):
        for row in batch:
            if writer is not None:
                writer.writerow(row)
            else:
                print(json.dumps(dict(zip(rel.columns, row, strict=True)), default=str, ensure_ascii=False), file=out)  # fmt: skip
        n += len(batch)
    return n


def _write_query(rel: Any, fmt: str, path: Path) -> int:
    """The query's rows into ``path`` (csv, json lines or Parquet), atomically."""
    from pipelines.infra.storage import atomic_path

    with atomic_path(path) as tmp:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            table = rel.to_arrow_table()
            pq.write_table(table, tmp)
            return int(table.num_rows)
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            return _print_query(rel, fmt, f)


def _root_and_region(args: argparse.Namespace) -> tuple[Path, Any]:
    """The data root and ``args.region`` from the regions file; the region is None (and
    the reason printed) when the file has no such region."""
    root = data_root(args.data)
    config = load_regions(Path(args.regions) if args.regions else None)
    try:
        return root, config.get(args.region)
    except KeyError as e:
        print(str(e.args[0]), file=sys.stderr)
        return root, None


def _cmd_export(args: argparse.Namespace) -> int:
    """A region's tables for desktop GIS: GeoPackage, FlatGeobuf or GeoJSON."""
    from pipelines.stages.export import ExportError, export_region

    root, region = _root_and_region(args)
    if region is None:
        return 2
    wanted = [p.strip() for chunk in (args.periods or []) for p in chunk.split(",") if p.strip()]
    try:
        periods = [region.period(p).id for p in wanted] or [p.id for p in region.periods]
    except KeyError as e:
        print(f"asmwatch export: {e.args[0]}", file=sys.stderr)
        return 2
    try:
        result = export_region(
            root, region.id, periods, args.format, Path(args.output) if args.output else None,
            say=print,
        )  # fmt: skip
    except ExportError as e:
        print(f"asmwatch export: {e}", file=sys.stderr)
        return 2
    if result.missing:
        print(f"not materialised, left out: {', '.join(result.missing)}", file=sys.stderr)
    if result.empty:
        print(f"no rows, left out: {', '.join(result.empty)}")
    print(f"wrote {len(result.tables)} tables to {result.path} ({args.format}; EPSG:4326)")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    """A region's map, report and web map from the catalog, in any language."""
    from pipelines.stages.reports import ReportError, make_reports

    root, region = _root_and_region(args)
    if region is None:
        return 2
    try:
        out = make_reports(
            root, region, say=print, language=args.language,
            out=Path(args.output) if args.output else None,
        )  # fmt: skip
    except ReportError as e:
        print(f"asmwatch report: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out.report_html}, {out.webmap_html} and {out.expansion_png} ({out.language})")
    return 0


DATA_HELP = "data root (default: $ASMWATCH_DATA or ./data)"
REGIONS_HELP = "regions file (default: $ASMWATCH_REGIONS or regions.yaml)"
PERIOD_HELP = "period id(s), repeated or comma-separated (default: every period of the region)"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("asmwatch")
    except PackageNotFoundError:  # running from a checkout that is not installed
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="asmwatch",
        description="Watch artisanal and small-scale mining from space.",
        epilog=(
            "Examples:\n  asmwatch demo\n  asmwatch run madre-de-dios --period 2023\n"
            '  asmwatch sql "SELECT * FROM region_summary"'
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--version", action="version", version=f"asmwatch {_version()}")
    sub = ap.add_subparsers(dest="cmd", required=True)

    def command(name: str, help: str, *examples: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name, help=help, description=help[:1].upper() + help[1:] + ".",
            epilog="Examples:\n" + "\n".join(f"  {e}" for e in examples),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )  # fmt: skip

    v = command("validate", "check a regions file and print every problem",
                "asmwatch validate", "asmwatch validate my-regions.yaml")  # fmt: skip
    v.add_argument("file", nargs="?", help=REGIONS_HELP)
    v.set_defaults(func=_cmd_validate)

    r = command(
        "run", "materialise a selection of assets for a region's periods, in order",
        "asmwatch run madre-de-dios --period 2023 --period 2024",
        "asmwatch run madre-de-dios --period 2024 --select asm_sites,asm_change",
        "asmwatch run kwale --from asm_sites      # sites and everything after them",
    )  # fmt: skip
    r.add_argument("region", help="region id from the regions file")
    r.add_argument("--period", dest="periods", action="append", help=PERIOD_HELP)
    which = r.add_mutually_exclusive_group()
    which.add_argument("--select", help="comma-separated assets to materialise (default: all)")
    which.add_argument("--from", dest="start", metavar="ASSET", help="this asset and all downstream of it")  # fmt: skip
    r.add_argument("--data", help=DATA_HELP)
    r.add_argument("--regions", help=REGIONS_HELP)
    r.add_argument("--train-epochs", type=int, default=0, help="cap the model's training epochs")
    r.set_defaults(func=_cmd_run)

    d = command("demo", "run every asset of the embedded demo region and say where the results are",
                "asmwatch demo", "asmwatch demo --data /tmp/asmwatch --train-epochs 2")  # fmt: skip
    d.add_argument("--data", help=DATA_HELP)
    d.add_argument("--regions", help=REGIONS_HELP)
    d.add_argument("--region", help="region id (default: the first embedded region)")
    d.add_argument(
        "--train-epochs", type=int, default=0,
        help="cap the model's training epochs (default: the asset's, 20 with early stopping)",
    )  # fmt: skip
    d.add_argument("--periods", action="append", help=PERIOD_HELP)
    d.set_defaults(func=_cmd_demo)

    b = command("backfill", "run every asset of one region, period by period in order, then its report",
                "asmwatch backfill madre-de-dios", "asmwatch backfill madre-de-dios --periods 2023,2024")  # fmt: skip
    b.add_argument("region", help="region id from the regions file")
    b.add_argument("--periods", action="append", help=PERIOD_HELP)
    b.add_argument("--data", help=DATA_HELP)
    b.add_argument("--regions", help=REGIONS_HELP)
    b.add_argument("--train-epochs", type=int, default=0, help="cap the model's training epochs")
    b.set_defaults(func=_cmd_demo)

    u = command("ui", "start the Dagster UI (dagster dev) on 127.0.0.1",
                "asmwatch ui", "asmwatch ui --data /srv/asmwatch --port 3001")  # fmt: skip
    u.add_argument("--data", help=DATA_HELP)
    u.add_argument("--regions", help=REGIONS_HELP)
    u.add_argument("--port", type=int, default=3000)
    u.set_defaults(func=_cmd_ui)

    p = command("probe", "before a first run: search one period of a region and read-check its clearest scenes",
                "asmwatch probe madre-de-dios", "asmwatch probe kwale --period 2023 --scenes 4")  # fmt: skip
    p.add_argument("region", help="region id from the regions file")
    p.add_argument("--period", help="period id (default: the region's latest)")
    p.add_argument("--scenes", type=int, default=2, help="scenes to read-check (default 2)")
    p.add_argument("--regions", help=REGIONS_HELP)
    p.add_argument("--data", help="data root, for embedded regions (default: $ASMWATCH_DATA or ./data)")  # fmt: skip
    p.set_defaults(func=_cmd_probe)

    dr = command("doctor", "check every table, COG and model file; print what to re-materialise (exit 1 if any)",
                 "asmwatch doctor", "asmwatch doctor --quick --data /srv/asmwatch", "asmwatch doctor --fix")  # fmt: skip
    dr.add_argument("--data", help=DATA_HELP)
    dr.add_argument("--regions", help=REGIONS_HELP)
    dr.add_argument("--quick", action="store_true", help="read Parquet footers only, not every row group")  # fmt: skip
    dr.add_argument("--fix", action="store_true", help="first rebuild the catalog and the registry table (derived; nothing is lost)")  # fmt: skip
    dr.set_defaults(func=_cmd_doctor)

    q = command("sql", "run a query against the DuckDB catalog (read-only)",
                "asmwatch sql \"SELECT period, mining_ha FROM region_summary ORDER BY period\"",
                "asmwatch sql \"SELECT * FROM alerts\" --format csv > alerts.csv",
                "asmwatch sql \"SELECT * FROM asm_sites\" --format parquet --output sites.parquet")  # fmt: skip
    q.add_argument("query")
    q.add_argument("--data", help=DATA_HELP)
    q.add_argument("--max-rows", type=int, default=None, help="rows shown (default: 50 for a table, all otherwise; 0: all)")  # fmt: skip
    q.add_argument(
        "--format",
        choices=("table", "box", "csv", "json", "parquet"),
        default="table",
        help="table (default; box is the same), csv, json lines, or parquet (with --output)",
    )
    q.add_argument("--output", metavar="FILE", help="write the rows to FILE (written whole or not at all)")  # fmt: skip
    q.set_defaults(func=_cmd_sql)

    x = command("export", "write a region's tables for QGIS and other desktop GIS",
                "asmwatch export madre-de-dios                      # madre-de-dios.gpkg",
                "asmwatch export kwale --period 2024 --format fgb --output kwale-2024",
                "asmwatch export demo-huepetuhe --format geojson")  # fmt: skip
    x.add_argument("region", help="region id from the regions file")
    x.add_argument("--period", dest="periods", action="append", help=PERIOD_HELP)
    x.add_argument("--format", choices=("gpkg", "fgb", "geojson"), default="gpkg",
                   help="gpkg (default: one file, a layer per table), fgb or geojson (a folder, a file per table; attribute tables as CSV)")  # fmt: skip
    x.add_argument("--output", help="the file (gpkg) or folder (fgb, geojson); default: <region>.gpkg or <region>-<format>/")  # fmt: skip
    x.add_argument("--data", help=DATA_HELP)
    x.add_argument("--regions", help=REGIONS_HELP)
    x.set_defaults(func=_cmd_export)

    from pipelines.i18n import LANGUAGES

    rp = command("report", "write a region's map, report and web map from the catalog, in a language",
                 "asmwatch report madre-de-dios                      # in the region's language",
                 "asmwatch report kwale --language fr --output kwale-fr")  # fmt: skip
    rp.add_argument("region", help="region id from the regions file")
    rp.add_argument("--language", choices=LANGUAGES, help="default: the region's (its `language`, else its country's)")  # fmt: skip
    rp.add_argument("--output", help="folder for the three files; default: <data>/reports/<region>/")  # fmt: skip
    rp.add_argument("--data", help=DATA_HELP)
    rp.add_argument("--regions", help=REGIONS_HELP)
    rp.set_defaults(func=_cmd_report)

    args = ap.parse_args(argv)
    try:
        return int(args.func(args))
    except RegionsError as e:
        print(str(e), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
