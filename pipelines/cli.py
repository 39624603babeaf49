"""The ``asmwatch`` command: ``demo``, ``backfill``, ``validate``, ``probe``, ``ui``, ``sql``,
``doctor``.

``asmwatch demo`` is what ``make demo`` runs: it materialises the pipeline for every
period of the embedded demo region through Dagster (in-process, recorded in the Dagster
instance under the data root so ``make ui`` shows the runs) and prints what landed where.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from pipelines.regions import RegionsError, load_regions, regions_path
from pipelines.storage import data_root


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
        print(f"  {r.id:24s} {r.source:18s} periods {periods}")
        for kind, layer in r.context.items():
            if not layer.startswith("embedded:") and not Path(layer).exists():
                print(f"    warning: context layer {kind} not found: {layer}")
    return 0


DAGSTER_YAML = """# Written by asmwatch (pipelines/cli.py); edit freely, it is not overwritten.
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


def ensure_dagster_home(home: Path) -> Path:
    """Create DAGSTER_HOME with asmwatch's dagster.yaml unless one is there."""
    home.mkdir(parents=True, exist_ok=True)
    cfg = home / "dagster.yaml"
    if not cfg.exists():
        cfg.write_text(DAGSTER_YAML)
    return cfg


def _cmd_ui(args: argparse.Namespace) -> int:
    """``dagster dev`` on 127.0.0.1 with the project's workspace and DAGSTER_HOME."""
    root = data_root(args.data)
    os.environ["ASMWATCH_DATA"] = str(root)
    use_dagster_home(root)
    import dagster as dg

    from assets.runs import fail_dead_runs

    fail_dead_runs(dg.DagsterInstance.get())
    workspace = Path(__file__).resolve().parent.parent / "workspace.yaml"
    cmd = [str(Path(sys.executable).parent / "dagster"), "dev", "-w", str(workspace),
           "-h", "127.0.0.1", "-p", str(args.port)]  # fmt: skip
    print(f"asmwatch ui: {' '.join(cmd)} (DAGSTER_HOME={os.environ['DAGSTER_HOME']})", flush=True)
    os.execv(cmd[0], cmd)
    return 0  # not reached


def _metadata(result: Any, node: str) -> dict[str, Any]:
    """The first materialisation's metadata values of ``node`` in a run result."""
    event = result.asset_materializations_for_node(node)[0]
    return {k: v.value for k, v in event.metadata.items()}


def _cmd_demo(args: argparse.Namespace) -> int:
    root = data_root(args.data)
    os.environ["ASMWATCH_DATA"] = str(root)
    if args.regions:
        os.environ["ASMWATCH_REGIONS"] = str(Path(args.regions).resolve())
    use_dagster_home(root)

    config = load_regions(args.regions)
    embedded = [r for r in config.regions if r.source == "embedded"]
    if args.region:
        try:
            region = config.get(args.region)
        except KeyError as e:
            print(str(e.args[0]), file=sys.stderr)
            return 2
    elif embedded:
        region = embedded[0]
    else:
        print("no region with source: embedded in the regions file", file=sys.stderr)
        return 2

    import dagster as dg

    from assets.definitions import defs
    from assets.partitions import partition_key
    from pipelines.composite import composite_path
    from pipelines.scenes import scenes_path

    periods = list(region.periods)
    if args.periods:
        wanted = [p.strip() for p in args.periods.split(",") if p.strip()]
        try:
            periods = [region.period(p) for p in wanted]
        except KeyError as e:
            print(str(e.args[0]), file=sys.stderr)
            return 2
        periods.sort(key=lambda p: p.start)  # change compares each period with the one before

    from assets.runs import fail_dead_runs, run_tags

    print(f"asmwatch {args.cmd}: region {region.id} ({region.name}), data root {root}")
    instance = dg.DagsterInstance.get()
    fail_dead_runs(instance)
    run_config = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}

    def run(job_name: str, label: str, key: Any = None, run_config_extra: Any = None) -> Any:
        result = defs.resolve_job_def(job_name).execute_in_process(
            instance=instance,
            tags=run_tags(),
            partition_key=key,
            run_config={**run_config, **(run_config_extra or {})},
            raise_on_error=False,
        )
        if not result.success:
            print(f"  {label}: FAILED; see the run {result.run_id} in `make ui`", file=sys.stderr)
            for ev in result.all_events:
                if ev.is_step_failure and ev.step_failure_data is not None:
                    err = ev.step_failure_data.error
                    print(err.message if err else "", file=sys.stderr)
            return None
        for check in result.get_asset_check_evaluations():
            warn = check.severity == dg.AssetCheckSeverity.WARN
            outcome = "passed" if check.passed else "warning" if warn else "failed"
            checks[outcome] += 1
            if not check.passed:
                name = f"{check.asset_key.to_user_string()}.{check.check_name}"
                print(f"  check {name} ({label}): {outcome}: {check.description}", file=sys.stderr)
        return result

    checks = {"passed": 0, "warning": 0, "failed": 0}
    t0 = time.monotonic()
    rows = []
    for period in periods:
        t = time.monotonic()
        result = run("ingest", period.id, partition_key(region.id, period.id))
        if result is None:
            return 1
        meta: dict[str, Any] = _metadata(result, "scenes")
        comp: dict[str, Any] = _metadata(result, "composite")
        rows.append((period.id, meta, time.monotonic() - t))
        cc = meta.get("cloud_cover") or {}
        print(
            f"  {period.id}: {meta['scene_count']} scenes (of {meta['returned']} returned, "
            f"{meta['dropped']} dropped), cloud cover median {cc.get('median', '-')}%, "
            f"tiles {', '.join(meta['tiles'])}; composite {comp['valid_fraction']:.1%} clear, "
            f"mean {comp['clear_count']['mean']} clear obs/pixel, "
            f"NDVI {comp['band_means'].get('NDVI', float('nan')):.2f}  "
            f"[{time.monotonic() - t:.1f} s]"
        )
    t = time.monotonic()
    layers = run("load_context", "context layers", region.id)
    if layers is None:
        return 1
    counts = {k.removesuffix("_count"): v for k, v in _metadata(layers, "context_layers").items() if k.endswith("_count")}  # fmt: skip
    print(
        "  context layers: "
        + ", ".join(f"{k} {v}" for k, v in counts.items())
        + f"  [{time.monotonic() - t:.1f} s]"
    )
    t = time.monotonic()
    print("  training the mining model (U-Net, CPU unless a GPU is present) ...", flush=True)
    train_cfg = {"max_epochs": args.train_epochs} if args.train_epochs else {}
    trained = run(
        "train_model",
        "mining_model",
        run_config_extra={"ops": {"mining_model": {"config": train_cfg}}},
    )
    if trained is None:
        return 1
    m = _metadata(trained, "mining_model")
    print(
        f"  mining_model: {m['model_id']} ({'reused' if m['reused'] else 'trained'} on "
        f"{m['device']}), held-out IoU {m['heldout_iou']:.3f} vs index baseline "
        f"{m['baseline_heldout_iou']:.3f}  [{time.monotonic() - t:.1f} s]"
    )
    for period in periods:
        t = time.monotonic()
        detected = run("detect", f"{period.id} detection", partition_key(region.id, period.id))
        if detected is None:
            return 1
        p = _metadata(detected, "mining_probability")
        sites = _metadata(detected, "asm_sites")
        change = _metadata(detected, "asm_change")
        pressure = _metadata(detected, "protected_area_pressure")
        risk = _metadata(detected, "concession_risk")
        warned = _metadata(detected, "alerts")
        growth = change["growth_vs_previous"]
        print(
            f"  {period.id}: mining {p['mining_ha']:.1f} ha detected (truth {p.get('truth_ha', '?')} ha) "
            f"in {sites['site_count']} sites ({sites['total_area_ha']:.1f} ha >= 0.5 ha), "
            f"IoU {p.get('truth_iou', float('nan')):.3f}; new {change['new_ha'] + change['expanded_ha']:.1f} ha, "
            f"re-vegetating {change['revegetating_ha']:.1f} ha"
            + (f", growth x{growth:.3f}" if growth is not None else "")
            + f"; ASM on {pressure['areas_with_asm']} of {pressure['areas']} protected/indigenous "
            f"areas ({pressure['asm_area_ha']:.1f} ha inside); top concession score "
            f"{risk['max_score']:.1f}, {warned['dagster/row_count']} alert(s)"
            + f"  [{time.monotonic() - t:.1f} s]"
        )
    t = time.monotonic()
    reported = run("report", "region report", region.id)
    if reported is None:
        return 1
    rep = _metadata(reported, "region_report")
    print(f"  region report: periods {', '.join(rep['periods'])}  [{time.monotonic() - t:.1f} s]")
    print(
        f"  asset checks: {checks['passed']} passed, {checks['warning']} warning(s), "
        f"{checks['failed']} failed"
    )
    print(f"done in {time.monotonic() - t0:.1f} s\n")
    print("Results:")
    print(f"  scenes (stac-geoparquet): {root / 'scenes' / region.id}/<period>.parquet")
    for period_id, _meta, _ in rows:
        print(f"    {scenes_path(root, region.id, period_id)}")
    print(f"  composites (COG):         {root / 'composite' / region.id}/<period>.tif")
    for period_id, _meta, _ in rows:
        print(f"    {composite_path(root, region.id, period_id)}")
    print(f"  mining probability (COG): {root / 'probability' / region.id}/<period>.tif")
    print(f"  models (registry):        {root / 'models'}  (view: models)")
    print(
        f"  ASM sites (GeoParquet):   {root / 'sites' / region.id}/<period>.parquet  (view: asm_sites)"
    )
    print(
        f"  ASM change (GeoParquet):  {root / 'change' / region.id}/<period>.parquet  (views: asm_change, region_summary)"
    )
    print(
        f"  context layers:           {root / 'context' / region.id}/<layer>.parquet  (views: protected_areas, indigenous_lands, concessions, settlements, rivers, grievances)"
    )
    print(
        f"  risk tables (GeoParquet): {root / 'risk'}/<table>/{region.id}/<period>.parquet  (views: concession_risk, protected_area_pressure, hotspots, alerts)"
    )
    print(
        f"  DuckDB catalog:           {root / 'asmwatch.duckdb'}  (views: scenes, models, asm_sites, asm_change, region_summary, the risk tables and the context layers)"
    )
    print(
        f"  embedded world:           {root / 'embedded' / region.id}  (COGs, STAC items, truth masks, context layers)"
    )
    print(f"  Dagster runs:             {os.environ['DAGSTER_HOME']}  (open with `make ui`)")
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
    from pipelines.catalog import open_catalog

    con = open_catalog(root, say=lambda m: print(m, file=sys.stderr))
    try:
        return con.execute(sql, params).fetchall()
    finally:
        con.close()


def _print_risk(root: Path, region_id: str, period_id: str) -> None:
    """The riskiest concessions and the most severe alerts of the latest period."""
    from pipelines.risk import SEVERITY_ORDER

    top = _query(
        root,
        "SELECT concession_id, name, score, band, score_inside, score_proximity, score_new, "
        "score_growth, score_people, score_grievances FROM concession_risk "
        "WHERE region = ? AND period = ? ORDER BY score DESC LIMIT 5",
        [region_id, period_id],
    )
    warned = _query(
        root,
        "SELECT severity, kind, feature_name, distance_m, area_ha FROM alerts "
        f"WHERE region = ? AND period = ? ORDER BY {SEVERITY_ORDER}, area_ha DESC LIMIT 8",
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
    for severity, kind, feature, distance, area in warned:
        print(f"  {severity:8} {kind:20} {feature or '':28} {distance:8.0f} m {area:7.2f} ha")


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
    from pipelines.probe import probe
    from pipelines.stac.search import StacSearchError
    from pipelines.stac.signing import SigningError

    config = load_regions(Path(args.regions) if args.regions else None)
    try:
        region = config.get(args.region)
        period = region.period(args.period) if args.period else region.periods[-1]
    except KeyError as e:
        print(f"asmwatch probe: {e.args[0]}", file=sys.stderr)
        return 2
    server = None
    if region.source == "embedded":
        from pipelines.embedded import start_server

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
    from pipelines.catalog import refresh_views
    from pipelines.integrity import doctor

    root = data_root(args.data)
    print(f"asmwatch doctor: data root {root}")
    recorded: list[tuple[str, str, str]] = []
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
    else:
        print(f"  no Dagster instance at {home}: checking the files only")
    if args.fix:
        print(f"  --fix: rebuilding the model registry table ({len(registry.rebuild(root))} model(s)) and the catalog")  # fmt: skip
        refresh_views(root, say=lambda m: print(f"  {m}"))
    report = doctor(root, deep=not args.quick, recorded=recorded)
    for note in report.notes:
        print(f"  note: {note}")
    if report.ok:
        print(f"OK: {report.checked} file(s) checked, none missing or damaged")
        return 0
    print(f"{len(report.findings)} problem(s) in {report.checked} file(s) checked:")
    for f in report.findings:
        print(f"  {f.path}: {f.problem}")
    todo = report.rematerialise()
    if todo:
        workspace = Path(__file__).resolve().parent.parent / "workspace.yaml"
        print("Re-materialise (in the UI, or from a shell):")
        for asset, key in todo:
            part = f" --partition '{key}'" if key else ""
            print(f"  {asset} {key or ''}".rstrip())
            print(f"    dagster asset materialize -w {workspace} --select {asset}{part}")
    return 1


def _cmd_sql(args: argparse.Namespace) -> int:
    """A query against the catalog: read-only, no file access outside the data root."""
    import duckdb

    from pipelines.catalog import (
        AnalystQueryError,
        CatalogError,
        connect_analyst,
        run_analyst_query,
    )

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
        if args.format == "box":
            rel.show(max_rows=args.max_rows, max_width=200)
        else:
            import csv
            import json

            rows = rel.fetchmany(args.max_rows) if args.max_rows > 0 else rel.fetchall()
            if args.format == "csv":
                w = csv.writer(sys.stdout)
                w.writerow(rel.columns)
                w.writerows(rows)
            else:
                for row in rows:
                    print(json.dumps(dict(zip(rel.columns, row, strict=True)), default=str, ensure_ascii=False))  # fmt: skip
    except AnalystQueryError as e:
        print(f"asmwatch sql: {e}", file=sys.stderr)
        return 2
    except duckdb.Error as e:
        print(f"asmwatch sql: {type(e).__name__.removesuffix('Exception')} error: {e}", file=sys.stderr)  # fmt: skip
        return 1
    finally:
        con.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="asmwatch", description="Watch artisanal and small-scale mining from space."
    )
    sub = ap.add_subparsers(dest="cmd", required=True)

    v = sub.add_parser("validate", help="check a regions file and print every problem")
    v.add_argument(
        "file", nargs="?", help="regions file (default: $ASMWATCH_REGIONS or regions.yaml)"
    )
    v.set_defaults(func=_cmd_validate)

    d = sub.add_parser("demo", help="run the pipeline on the embedded demo region")
    d.add_argument("--data", help="data root (default: $ASMWATCH_DATA or ./data)")
    d.add_argument("--regions", help="regions file (default: $ASMWATCH_REGIONS or regions.yaml)")
    d.add_argument("--region", help="region id (default: the first embedded region)")
    d.add_argument(
        "--train-epochs", type=int, default=0,
        help="cap the model's training epochs (default: the asset's, 20 with early stopping)",
    )  # fmt: skip
    d.add_argument("--periods", help="comma-separated period ids (default: all of the region's)")
    d.set_defaults(func=_cmd_demo)

    b = sub.add_parser(
        "backfill",
        help="run every asset of one region, period by period in order, then its report",
    )
    b.add_argument("region", help="region id from the regions file")
    b.add_argument("--periods", help="comma-separated period ids (default: all of the region's)")
    b.add_argument("--data", help="data root (default: $ASMWATCH_DATA or ./data)")
    b.add_argument("--regions", help="regions file (default: $ASMWATCH_REGIONS or regions.yaml)")
    b.add_argument("--train-epochs", type=int, default=0, help="cap the model's training epochs")
    b.set_defaults(func=_cmd_demo)

    u = sub.add_parser("ui", help="start the Dagster UI (dagster dev) on 127.0.0.1")
    u.add_argument("--data", help="data root (default: $ASMWATCH_DATA or ./data)")
    u.add_argument("--port", type=int, default=3000)
    u.set_defaults(func=_cmd_ui)

    p = sub.add_parser(
        "probe",
        help="before a first run: search one period of a region and read-check its clearest scenes",
    )
    p.add_argument("region", help="region id from the regions file")
    p.add_argument("--period", help="period id (default: the region's latest)")
    p.add_argument("--scenes", type=int, default=2, help="scenes to read-check (default 2)")
    p.add_argument("--regions", help="regions file (default: $ASMWATCH_REGIONS or regions.yaml)")
    p.add_argument("--data", help="data root, for embedded regions (default: $ASMWATCH_DATA or ./data)")  # fmt: skip
    p.set_defaults(func=_cmd_probe)

    dr = sub.add_parser(
        "doctor",
        help="check every table, COG and model file; print what to re-materialise (exit 1 if any)",
    )
    dr.add_argument("--data", help="data root (default: $ASMWATCH_DATA or ./data)")
    dr.add_argument("--quick", action="store_true", help="read Parquet footers only, not every row group")  # fmt: skip
    dr.add_argument("--fix", action="store_true", help="first rebuild the catalog and the registry table (derived; nothing is lost)")  # fmt: skip
    dr.set_defaults(func=_cmd_doctor)

    s = sub.add_parser("sql", help="run a query against the DuckDB catalog (read-only)")
    s.add_argument("query")
    s.add_argument("--data", help="data root (default: $ASMWATCH_DATA or ./data)")
    s.add_argument("--max-rows", type=int, default=50, help="rows shown (0: all, csv/json only)")
    s.add_argument(
        "--format",
        choices=("box", "csv", "json"),
        default="box",
        help="box (default), csv, or json lines",
    )
    s.set_defaults(func=_cmd_sql)

    args = ap.parse_args(argv)
    try:
        return int(args.func(args))
    except RegionsError as e:
        print(str(e), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
