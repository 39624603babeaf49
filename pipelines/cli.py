"""The ``asmwatch`` command: ``demo``, ``validate``, ``sql``.

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


def _cmd_demo(args: argparse.Namespace) -> int:
    root = data_root(args.data)
    os.environ["ASMWATCH_DATA"] = str(root)
    if args.regions:
        os.environ["ASMWATCH_REGIONS"] = str(Path(args.regions).resolve())
    os.environ.setdefault("DAGSTER_HOME", str(root / "dagster_home"))
    home = Path(os.environ["DAGSTER_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "dagster.yaml").exists():
        (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")

    config = load_regions(args.regions)
    embedded = [r for r in config.regions if r.source == "embedded"]
    if args.region:
        region = config.get(args.region)
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

    print(f"asmwatch demo: region {region.id} ({region.name}), data root {root}")
    instance = dg.DagsterInstance.get()
    job = defs.resolve_implicit_global_asset_job_def()
    t0 = time.monotonic()
    rows = []
    for period in region.periods:
        t = time.monotonic()
        result = job.execute_in_process(
            instance=instance,
            partition_key=partition_key(region.id, period.id),
            run_config={"loggers": {"console": {"config": {"log_level": "INFO"}}}},
            raise_on_error=False,
        )
        if not result.success:
            print(
                f"  {period.id}: FAILED; see the run {result.run_id} in `make ui`", file=sys.stderr
            )
            for ev in result.all_events:
                if ev.is_failure and ev.step_failure_data is not None:
                    print(
                        ev.step_failure_data.error.message if ev.step_failure_data.error else "",
                        file=sys.stderr,
                    )
            return 1
        meta: dict[str, Any] = {
            k: v.value
            for k, v in result.asset_materializations_for_node("scenes")[0].metadata.items()
        }
        comp: dict[str, Any] = {
            k: v.value
            for k, v in result.asset_materializations_for_node("composite")[0].metadata.items()
        }
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
    print(f"done in {time.monotonic() - t0:.1f} s\n")
    print("Results:")
    print(f"  scenes (stac-geoparquet): {root / 'scenes' / region.id}/<period>.parquet")
    for period_id, _meta, _ in rows:
        print(f"    {scenes_path(root, region.id, period_id)}")
    print(f"  composites (COG):         {composite_path(root, region.id, '<period>')}")
    for period_id, _meta, _ in rows:
        print(f"    {composite_path(root, region.id, period_id)}")
    print(f"  DuckDB catalog:           {root / 'asmwatch.duckdb'}  (view: scenes)")
    print(
        f"  embedded world:           {root / 'embedded' / region.id}  (COGs, STAC items, truth masks, context layers)"
    )
    print(f"  Dagster runs:             {os.environ['DAGSTER_HOME']}  (open with `make ui`)")
    print("\nQuery it:")
    print(
        f"  .venv/bin/asmwatch sql \"SELECT period, count(*) AS scenes, round(avg(cloud_cover), 1) AS cloud FROM scenes WHERE region = '{region.id}' GROUP BY period ORDER BY period\""
    )
    return 0


def _cmd_sql(args: argparse.Namespace) -> int:
    from pipelines.catalog import CATALOG_FILE, connect

    root = data_root(args.data)
    db = root / CATALOG_FILE
    if not db.exists():
        print(f"no catalog at {db}: run `make demo` or materialise an asset first", file=sys.stderr)
        return 2
    con = connect(db, read_only=True)
    try:
        rel = con.sql(args.query)
        if rel is None:
            return 0
        rel.show(max_rows=args.max_rows, max_width=200)
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
    d.set_defaults(func=_cmd_demo)

    s = sub.add_parser("sql", help="run a query against the DuckDB catalog (read-only)")
    s.add_argument("query")
    s.add_argument("--data", help="data root (default: $ASMWATCH_DATA or ./data)")
    s.add_argument("--max-rows", type=int, default=50)
    s.set_defaults(func=_cmd_sql)

    args = ap.parse_args(argv)
    try:
        return int(args.func(args))
    except RegionsError as e:
        print(str(e), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
