"""Reports: the expansion map, the HTML region report and the offline web map.

They are checked against the tables of one real demo run (the session's ``demo_run``),
and the web map is opened in headless Chromium (Debian's package, which `make test`
installs) through Playwright: layers must draw their features, the period selector must
switch them, nothing may be fetched from the network, and the console must stay clean.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import markupsafe
import numpy as np
import pytest

from pipelines.regions import load_regions
from pipelines.stages.catalog import connect, refresh_views
from pipelines.stages.reports import ReportError, make_reports, period_colours

ROOT = Path(__file__).resolve().parents[3]
REGION = "demo-huepetuhe"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>'


def _rows(root: Path, sql: str, params: list[Any] | None = None) -> list[Any]:
    con = connect(root / "asmwatch.duckdb", read_only=True)
    try:
        return con.execute(sql, params or []).fetchall()
    finally:
        con.close()


def _region() -> Any:
    return load_regions(ROOT / "regions.yaml").get(REGION)


@pytest.mark.slow
def test_region_report_shows_the_tables(demo_run: tuple[Path, str]) -> None:
    root, _ = demo_run
    page = (root / "reports" / REGION / "report.html").read_text(encoding="utf-8")
    summary = _rows(
        root,
        "SELECT period, mining_ha, growth_vs_previous FROM region_summary WHERE region = ? "
        "ORDER BY period_start",
        [REGION],
    )
    assert [r[0] for r in summary] == ["2019", "2020", "2021"]
    from pipelines.i18n import Lang

    en = Lang("en")  # the report's own formatting (CLDR rounds half up: 1.0695 -> 1.070)
    for period, mining, growth in summary:
        assert en.num(mining, 1) in page, period
        if growth is not None:
            assert en.num(growth, 3) in page
    # What happened, in words, at the top: the latest period against the one before.
    assert 'id="what-happened"' in page and page.index("what-happened") < page.index(
        'id="headline"'
    )
    latest, before = summary[-1][1], summary[-2][1]
    assert (
        f"In 2021, {latest:,.1f} ha of artisanal and small-scale mining (ASM) were mapped" in page
    )
    assert f"{abs(latest - before):,.1f} ha more than in 2020 ({before:,.1f} ha)" in page
    # Methods and limits: the scenes each composite used, the detector and its held-out
    # accuracy, and that findings need checking on the ground; no pointers into the code.
    import rasterio

    assert 'id="method"' in page and "Methods and limits" in page
    for period in ("2019", "2020", "2021"):
        with rasterio.open(root / "composite" / REGION / f"{period}.tif") as src:
            used = len(src.tags()["asmwatch_scenes"].split(","))
        assert f'<td class="l">{period}</td><td>{used}</td>' in page, period
    iou = _rows(root, "SELECT heldout_iou FROM models ORDER BY created_at DESC LIMIT 1", [])[0][0]
    assert f"(intersection over union) is {iou:,.2f}, against" in page
    # The model's domain: chosen as trained on this region, on simulated scenes, and said so.
    import json

    with rasterio.open(root / "probability" / REGION / "2021.tif") as src:
        tags = src.tags()
    assert json.loads(tags["asmwatch_model_domain"])["imagery"] == "embedded"
    assert tags["asmwatch_model_choice"].startswith("trained on this region")
    assert float(tags["asmwatch_model_heldout_iou"]) == pytest.approx(iou, abs=1e-4)
    assert (
        f"trained on simulated scenes of {REGION} (asmwatch&#39;s embedded world, not real imagery)"
        in page
    )
    assert "needs checking on the ground" in page
    assert "docs/risk.md" not in page and "regions file" not in page
    top = _rows(
        root,
        "SELECT name, score, score_inside, score_proximity FROM concession_risk "
        "WHERE region = ? AND period = '2021' ORDER BY score DESC LIMIT 1",
        [REGION],
    )[0]
    assert top[0] in page and f"<b>{top[1]:,.1f}</b>" in page
    n_alerts = _rows(root, "SELECT count(*) FROM alerts WHERE region = ? AND period = '2021'", [REGION])  # fmt: skip
    assert f"{n_alerts[0][0]} alerts (critical: " in page
    # Alerts by the reference readers quote, and what each touches in words; no hash ids.
    ref, kind = _rows(root, "SELECT alert_ref, change_kind FROM alerts WHERE region = ? AND period = '2021' ORDER BY rank LIMIT 1", [REGION])[0]  # fmt: skip
    row = re.search(rf'<tr><td class="l">{ref}</td>.*?</tr>', page)
    assert row is not None
    touched = _rows(
        root,
        "SELECT f.relation, coalesce(c.name, f.feature_id) FROM alert_features f JOIN alerts a USING (alert_id) "
        "LEFT JOIN (SELECT 'concessions' AS layer, feature_id, name FROM concessions UNION ALL "
        "SELECT 'protected_areas', feature_id, name FROM protected_areas UNION ALL "
        "SELECT 'indigenous_lands', feature_id, name FROM indigenous_lands) c "
        "ON c.layer = f.feature_layer AND c.feature_id = f.feature_id WHERE a.alert_ref = ?",
        [ref],
    )  # fmt: skip
    assert touched and row.group(0).count("; ") == len(touched) - 1
    assert f"{'New' if kind == 'new' else 'Expanded'} mining: " in row.group(0)
    for relation, name in touched:
        said = f"inside {markupsafe.escape(name)} (" if relation == "inside" else f" m from LSM concession {markupsafe.escape(name)}"  # fmt: skip
        assert said in row.group(0), (said, row.group(0))
    ids = [r[0] for r in _rows(root, "SELECT alert_id FROM alerts WHERE region = ?", [REGION])]
    assert ids and not any(i in page for i in ids)
    assert "large-scale mining (LSM)" in page
    assert 'id="pressure"' in page and 'id="alerts"' in page
    assert 'src="data:image/png;base64,' in page  # the map is inside the page
    # Offline: nothing is loaded from elsewhere.
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)


@pytest.mark.slow
def test_expansion_map_has_a_colour_per_period(demo_run: tuple[Path, str]) -> None:
    from PIL import Image

    root, _ = demo_run
    with Image.open(root / "reports" / REGION / "expansion.png") as im:
        assert im.format == "PNG" and im.width >= 800 and im.height >= 700
        px = np.asarray(im.convert("RGB")).reshape(-1, 3).astype(int)
    for colour in period_colours(3):
        rgb = np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)])
        share = float((np.abs(px - rgb).sum(axis=1) <= 6).mean())
        assert share > 0.001, f"{colour}: {share:.5f} of the map"


def _open(page_path: Path, screenshot: Path) -> dict[str, Any]:
    """Open the web map in headless Chromium; what it drew, logged and fetched."""
    from playwright.sync_api import sync_playwright

    if not CHROMIUM.exists() and os.environ.get("CI"):
        pytest.fail(f"{CHROMIUM} is absent in CI: `make test` should have installed chromium")
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent: `make test` installs Debian's chromium (needs root)")
    seen: dict[str, Any] = {"console": [], "requests": [], "dialogs": []}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.on("console", lambda m: seen["console"].append((m.type, m.text)))
            page.on("pageerror", lambda e: seen["console"].append(("pageerror", str(e))))
            page.on("request", lambda r: seen["requests"].append(r.url))
            page.on("dialog", lambda d: (seen["dialogs"].append(d.message), d.dismiss()))
            page.goto(page_path.as_uri())
            page.wait_for_selector("body[data-ready='1']", timeout=30_000)
            seen["counts"] = page.evaluate("window.asmwatch.counts()")
            seen["period"] = page.evaluate("window.asmwatch.current()")
            seen["dom"] = {
                cls: page.locator(f"path.asm-layer-{cls}").count()
                for cls in (
                    "mining",
                    "revegetating",
                    "alerts",
                    "protected_areas",
                    "indigenous_lands",
                    "concessions",
                    "settlements",
                    "grievances",
                )
            }
            seen["backdrops"] = page.locator("img.asm-backdrop").count()
            page.screenshot(path=str(screenshot))
            page.select_option("#period", "0")
            seen["first"] = page.evaluate("window.asmwatch.counts()")
            seen["first_period"] = page.get_attribute("body", "data-period")
            seen["stats"] = page.text_content("#period-stats")
            seen["popup"] = page.evaluate("window.asmwatch.popup('concessions', 0)")
        finally:
            browser.close()
    return seen


@pytest.mark.slow
def test_web_map_renders_offline_in_chromium(demo_run: tuple[Path, str]) -> None:
    root, _ = demo_run
    shot = root / "reports" / REGION / "webmap-screenshot.png"
    seen = _open(root / "reports" / REGION / "webmap.html", shot)
    assert seen["console"] == [] and seen["dialogs"] == []
    # Only the page itself (and images inside it) were loaded: Leaflet is inlined.
    assert [u for u in seen["requests"] if not u.startswith("data:")] == [(root / "reports" / REGION / "webmap.html").as_uri()]  # fmt: skip

    def n(sql: str, period: str) -> int:
        return _rows(root, sql, [REGION, period])[0][0]

    mining_sql = "SELECT count(*) FROM asm_change WHERE region = ? AND period = ? AND kind IN ('new', 'expanded', 'stable')"  # fmt: skip
    former_sql = "SELECT count(*) FROM asm_change WHERE region = ? AND period = ? AND kind IN ('abandoned', 'revegetating')"  # fmt: skip
    alerts_sql = "SELECT count(*) FROM alerts WHERE region = ? AND period = ? AND listed"
    latest, first = seen["counts"], seen["first"]
    assert seen["period"] == "2021"
    assert latest["mining"] == n(mining_sql, "2021") > 0
    assert latest["revegetating"] == n(former_sql, "2021") > 0
    assert latest["alerts"] == n(alerts_sql, "2021") > 0
    for layer in (
        "protected_areas",
        "indigenous_lands",
        "concessions",
        "settlements",
        "grievances",
    ):
        want = _rows(root, f"SELECT count(*) FROM {layer} WHERE region = ?", [REGION])[0][0]
        assert latest[layer] == want > 0
        assert seen["dom"][layer] == want  # drawn as SVG paths (points: circle markers)
    # Every feature is drawn (a feature is one SVG path, or more for collections).
    assert seen["dom"]["mining"] >= latest["mining"] and seen["dom"]["alerts"] == latest["alerts"]
    assert seen["backdrops"] == 1
    # The selector switches to the first period: its own layers, no alerts in a baseline.
    assert seen["first_period"] == "2019" and first["mining"] == n(mining_sql, "2019")
    assert first["alerts"] == 0 and first["revegetating"] == 0
    assert "2019" in seen["stats"] and "ha of ASM" in seen["stats"]
    assert "Risk of conflict with ASM, 2019" in seen["popup"] and " of 100 (" in seen["popup"]
    assert re.search(r"ASM inside\s*[\d.]+ of 30", seen["popup"]), seen["popup"]
    # The screenshot shows a map, not a blank page.
    from PIL import Image

    with Image.open(shot) as im:
        px = np.asarray(im.convert("RGB"))
    assert px.shape[:2] == (900, 1200) and px.reshape(-1, 3).std(axis=0).mean() > 20


@pytest.mark.slow
def test_reports_treat_names_as_text(demo_run: tuple[Path, str], tmp_path: Path) -> None:
    """A concession named like an attack stays text in the report and the web map."""
    import geopandas as gpd

    root = tmp_path / "data"
    shutil.copytree(demo_run[0], root, ignore=shutil.ignore_patterns("dagster_home", "embedded", "probability", "models"))  # fmt: skip
    for table in ("context/demo-huepetuhe/concessions.parquet",):
        frame = gpd.read_parquet(root / table)
        frame["name"] = HOSTILE
        frame.to_parquet(root / table, write_covering_bbox=True, index=False)
    for path in (root / "risk" / "concession_risk" / REGION).glob("*.parquet"):
        import pandas as pd

        frame = pd.read_parquet(path)
        frame["name"] = HOSTILE
        frame.to_parquet(path, index=False)
    refresh_views(root)
    out = make_reports(root, _region())
    page = out.report_html.read_text(encoding="utf-8")
    assert HOSTILE not in page and "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in page
    webmap = out.webmap_html.read_text(encoding="utf-8")
    assert "<script>alert" not in webmap  # the JSON escapes '<'
    seen = _open(out.webmap_html, tmp_path / "shot.png")
    assert seen["dialogs"] == [] and seen["console"] == []
    assert HOSTILE in seen["popup"]  # shown as text


def test_reports_need_the_tables(tmp_path: Path) -> None:
    # No catalog: it is built from the files (none yet), then the report says what to run.
    with pytest.raises(ReportError, match="materialise asm_change"):
        make_reports(tmp_path, _region())
    assert (tmp_path / "asmwatch.duckdb").exists()
    refresh_views(tmp_path)  # a catalog with no tables yet
    with pytest.raises(ReportError, match="materialise asm_change"):
        make_reports(tmp_path, _region())
    assert not (tmp_path / "reports").exists()


@pytest.mark.slow
def test_a_million_sites_make_a_small_web_map_that_opens_fast(
    demo_run: tuple[Path, str], tmp_path: Path
) -> None:
    """1,000,000 change areas in a period reach the maps as areas summed on a grid."""
    import shutil
    import time

    from bench.report import write_change
    from pipelines.regions import load_regions
    from pipelines.stages.reports import MAX_POLYGONS, make_reports

    root = tmp_path / "data"
    shutil.copytree(demo_run[0], root, symlinks=True)
    write_change(root, 1_000_000)
    region = load_regions(ROOT / "regions.yaml").get(REGION)
    t = time.perf_counter()
    reports = make_reports(root, region, say=lambda _m: None)
    made = time.perf_counter() - t
    size = reports.webmap_html.stat().st_size
    assert size < 20e6, f"web map {size / 1e6:.1f} MB"
    t = time.perf_counter()
    seen = _open(reports.webmap_html, tmp_path / "shot.png")
    opened = time.perf_counter() - t
    assert seen["console"] == [] and seen["period"] == "2021"
    assert 0 < seen["counts"]["mining"] <= MAX_POLYGONS
    print(f"1,000,000 change areas: reports in {made:.1f} s, web map {size / 1e6:.1f} MB, opened in {opened:.1f} s")  # fmt: skip
    assert opened < 30, "opens in a few seconds (30 s bound for a loaded CI machine)"


def test_the_plain_summary_says_what_happened_from_the_tables() -> None:
    """The sentences at the top of the report: every figure is one of the tables'."""
    from pipelines.stages.reports import RegionData, plain_summary
    from tests.conftest import small_region

    region = small_region()
    row = {"abandoned_ha": 0.0, "revegetating_ha": 0.0, "new_ha": 0.0, "expanded_ha": 0.0}
    summary = [
        {**row, "period": "2019", "mining_ha": 100.0, "new_ha": 100.0, "previous_period": None,
         "previous_mining_ha": None, "growth_vs_previous": None, "growth_vs_first": 1.0},
        {**row, "period": "2020", "mining_ha": 150.0, "previous_period": "2019", "previous_mining_ha": 100.0,
         "growth_vs_previous": 1.5, "growth_vs_first": 1.5, "new_ha": 40.0, "expanded_ha": 12.5,
         "abandoned_ha": 1.5, "revegetating_ha": 1.0},
    ]  # fmt: skip
    pressure = {"2020": [
        {"area_id": "PA1", "name": "Parque Nacional", "kind": "protected", "asm_area_ha": 3.25},
        {"area_id": "IL1", "name": None, "kind": "indigenous", "asm_area_ha": 7.0},
        {"area_id": "X", "name": "Untouched", "kind": "protected", "asm_area_ha": 0.0},
    ]}  # fmt: skip
    risk = {"2020": [{"concession_id": "C1", "name": "Mina Grande", "band": "critical", "score": 80.04},
                     {"concession_id": "C2", "name": "Quiet", "band": "low", "score": 3.0}]}  # fmt: skip
    data = RegionData(
        region, ["2019", "2020"], summary, {}, {}, risk, pressure, {"2019": [], "2020": []},
        alert_counts={"2020": {"critical": (2, 5.0), "medium": (3, 2.0)}},
    )  # fmt: skip
    text = plain_summary(data)
    assert text == [
        "In 2020, 150.0 ha of artisanal and small-scale mining (ASM) were mapped in test region.",
        "That is 50.0 ha more than in 2019 (100.0 ha) and 1.50 times the area of 2019 (100.0 ha).",
        "40.0 ha were new mining sites and 12.5 ha expansions of existing ones; 2.5 ha mined before were no longer mined, 1.0 ha of it re-vegetating.",
        "Most affected protected areas and indigenous lands: IL1 (indigenous land, 7.0 ha inside); Parque Nacional (protected area, 3.2 ha inside).",
        "Large-scale mining (LSM) concessions most at risk of conflict with ASM: Mina Grande (critical, score 80.0 of 100).",
        "5 alerts were raised (critical: 2, medium: 3); they are listed below and need checking on the ground.",
    ]  # fmt: skip
    # The same sentences in Spanish, with Spanish numbers.
    from pipelines.i18n import Lang

    es = plain_summary(data, lang=Lang("es"))
    assert es[0] == "En 2020 se cartografiaron 150,0 ha de minería artesanal y de pequeña escala (MAPE) en test region."  # fmt: skip
    assert es[1] == "Son 50,0 ha más que en 2019 (100,0 ha) y 1,50 veces la superficie de 2019 (100,0 ha)."  # fmt: skip
    assert es[-1] == "Se emitieron 5 alertas (crítico: 2, medio: 3); figuran más abajo y deben verificarse en el terreno."  # fmt: skip
    assert "Mina Grande (nivel crítico, puntuación 80,0 de 100)" in es[-2]
    baseline = RegionData(region, ["2019"], summary[:1], {}, {}, {}, {}, {"2019": []})
    assert plain_summary(baseline)[1] == "2019 is the first period: the baseline that later periods are compared with."  # fmt: skip


def test_methods_name_imported_detections_and_a_missing_detector(tmp_path: Path) -> None:
    import dataclasses

    from pipelines.regions import DetectionsSpec
    from pipelines.stages.reports import RegionData, detector_text
    from tests.conftest import small_region

    region = small_region()
    data = RegionData(region, ["2019"], [], {}, {}, {}, {}, {"2019": []})
    assert detector_text(tmp_path, data).startswith("The detector is not known")
    imported = dataclasses.replace(region, detections=DetectionsSpec(path="/x/amw_2025.geojson"))
    text = detector_text(tmp_path, dataclasses.replace(data, region=imported))
    assert text.startswith("Mining areas are imported detections from amw_2025.geojson")


@pytest.mark.slow
def test_the_report_prints_on_a4_without_cut_tables(demo_run: tuple[Path, str], tmp_path: Path) -> None:  # fmt: skip
    """An information centre pins the report on a wall: Chromium's print-to-PDF on A4
    gives a few pages, and in print layout no table, figure or row is wider than the
    page or split across two pages."""
    import re

    from playwright.sync_api import sync_playwright

    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is absent in CI: `make test` should have installed chromium")
        pytest.skip(f"{CHROMIUM} is absent: `make test` installs Debian's chromium (needs root)")
    report = demo_run[0] / "reports" / REGION / "report.html"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            # A4 minus the @page margins (186 mm) at CSS's 96 px per inch.
            page = browser.new_page(viewport={"width": 703, "height": 1000})
            page.goto(report.as_uri())
            page.emulate_media(media="print")
            layout = page.evaluate(
                """() => {
                  const width = document.documentElement.clientWidth;
                  const wide = [...document.querySelectorAll('table, figure, img, p, ul')]
                    .filter(e => e.getBoundingClientRect().width > width + 1)
                    .map(e => e.tagName + ' ' + (e.closest('section') || {}).id);
                  const rows = getComputedStyle(document.querySelector('tr')).breakInside;
                  const head = getComputedStyle(document.querySelector('thead')).display;
                  return {width, wide, rows, head, scroll: document.documentElement.scrollWidth};
                }"""
            )
            pdf = page.pdf(format="A4", print_background=True, path=str(tmp_path / "report.pdf"))
        finally:
            browser.close()
    assert layout["wide"] == [] and layout["scroll"] <= layout["width"], layout
    assert layout["rows"] == "avoid" and layout["head"] == "table-header-group"
    pages = len(re.findall(rb"/Type\s*/Page(?!s)", pdf))
    assert 2 <= pages <= 8, pages
    assert pdf[:5] == b"%PDF-" and (tmp_path / "report.pdf").stat().st_size > 50_000


def test_the_report_states_the_unit_the_sites_were_mapped_with(tmp_path: Path) -> None:
    """A run that set ``mmu_ha`` is reported with that unit (the sites files record it),
    and periods mapped with different units are named, in the report's language."""
    from pipelines.i18n import Lang
    from pipelines.infra.layout import sites_path
    from pipelines.stages.change import NOTE_MMU_DIFFERS
    from pipelines.stages.reports import (
        RegionData,
        distance_note,
        note_text,
        recorded_distances,
        recorded_units,
        threshold_texts,
        unit_note,
    )
    from pipelines.stages.sites import sites_table
    from tests.conftest import small_region
    from tests.pipelines.stages.test_sites import _raster

    region = small_region()
    prob = np.zeros((64, 64), np.float32)
    prob[10:20, 10:20] = 0.9
    src = _raster(tmp_path / "p.tif", prob)
    for period, mmu in (("2019", 0.25), ("2020", 1.0)):
        target = sites_path(tmp_path, region.id, period)
        target.parent.mkdir(parents=True, exist_ok=True)
        sites_table(src, region.id, period, target, mmu_ha=mmu)
    data = RegionData(region, ["2019", "2020", "2021"], [], {}, {}, {}, {}, {})
    units = recorded_units(tmp_path, data)
    assert units == {"2019": 0.25, "2020": 1.0}, "2021 has no sites file"
    en, fr = Lang("en"), Lang("fr")
    assert threshold_texts(en, units["2020"])["mmu_ha"] == "1"
    assert threshold_texts(en)["mmu_ha"] == "0.5", "the default where nothing is recorded"
    assert threshold_texts(fr, 0.25)["mmu_ha"] == "0,25"
    assert "2019: 0.25 ha, 2020: 1 ha" in unit_note(en, units)
    assert "2019: 0,25 ha" in unit_note(fr, units) and "unité minimale" in unit_note(fr, units)
    assert unit_note(en, {"2019": 0.5, "2020": 0.5}) == ""
    import pyarrow as pa

    from pipelines.stages.risk import SETTING_KEYS, write_table

    for period, metres in (("2019", 5000.0), ("2020", 2500.0)):
        table = pa.table({"alert_id": pa.array([], pa.string())})
        write_table(table, tmp_path, "alerts", region.id, period, metadata={SETTING_KEYS["alert_distance_m"]: str(metres)})  # fmt: skip
    distances = recorded_distances(tmp_path, data)
    assert distances == {"2019": 5000.0, "2020": 2500.0}
    assert threshold_texts(en, None, distances["2020"])["alert_distance_km"] == "2.5"
    assert threshold_texts(en)["alert_distance_km"] == "5"
    assert "2019: 5 km, 2020: 2.5 km" in distance_note(en, distances)
    assert "2020: 2,5 km" in distance_note(fr, distances) and distance_note(en, {"2019": 5000.0}) == ""  # fmt: skip
    note = NOTE_MMU_DIFFERS.format(previous_period="2019", previous="0.25", current="1", used="1")
    assert note_text(en, note) == note
    said = note_text(fr, note)
    assert said != note and "0,25 ha" in said and "2019" in said
