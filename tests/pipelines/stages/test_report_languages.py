"""The report and the web map in every language, at a desktop's and a phone's size.

Each language's pages are rendered from the demo run's tables and opened in Debian's
Chromium at 1400x900 and 390x844. At both sizes the screenshot is taken and the layout is
checked (no element wider than the screen, the map's controls inside the screen and not
on top of each other, the layer list folded on a phone); the pages must show the summary,
the methods, the legend, the image dates and the generation date, in the language's
words and number formats, with no English left (apart from names from the data). A
pseudo-language, which brackets every translated message, finds any visible text that
does not go through the catalogues at all.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipelines.i18n import LANGUAGES, Lang, read_catalog
from pipelines.stages.reports import Reports, gather, imagery_facts, make_reports
from tests.pipelines.stages.test_reports import CHROMIUM, CHROMIUM_ARGS, REGION, _region, _rows

pytestmark = pytest.mark.slow
SIZES = ((1400, 900), (390, 844))
PLACEHOLDER = re.compile(r"%\(\w+\)s")
WORD = re.compile(r"[^\W\d_]+")
#: Symbols and names that are the same in every language.
NEUTRAL = {"ha", "m", "km", "utc", "leaflet", "asmwatch", "sentinel", "copernicus", "ndvi"}

# What the pages show, gathered in the browser: every text node (shown or folded), the
# titles, labels and alternative texts, and the page title.
TEXTS_JS = """() => {
  const out = [document.title];
  const walk = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  let n;
  while ((n = walk.nextNode())) {
    if (n.parentElement && n.parentElement.closest('script, style')) continue;
    const t = n.textContent.trim();
    if (t) out.push(t);
  }
  document.querySelectorAll('[title], [aria-label], [alt]').forEach(e => {
    for (const a of ['title', 'aria-label', 'alt']) { const v = e.getAttribute(a); if (v) out.push(v); }
  });
  return out;
}"""

# The map's layout: the controls that show, where they are, which overlap.
MAP_LAYOUT_JS = """() => {
  const W = window.innerWidth, H = window.innerHeight;
  const boxes = [...document.querySelectorAll('.leaflet-control')]
    .filter(e => e.offsetParent !== null)
    .map(e => { const r = e.getBoundingClientRect();
      return {name: e.id || e.className.split(' ').filter(c => c !== 'leaflet-control')[0], l: r.left, t: r.top, r: r.right, b: r.bottom}; });
  const outside = boxes.filter(b => b.l < 0 || b.t < 0 || b.r > W + 0.5 || b.b > H + 0.5).map(b => b.name);
  const overlaps = [];
  for (let i = 0; i < boxes.length; i++) for (let j = i + 1; j < boxes.length; j++) {
    const a = boxes[i], b = boxes[j];
    if (Math.min(a.r, b.r) - Math.max(a.l, b.l) > 1 && Math.min(a.b, b.b) - Math.max(a.t, b.t) > 1) overlaps.push(a.name + ' / ' + b.name);
  }
  const panel = document.getElementById('panel');
  const clipped = [...panel.querySelectorAll('*')].filter(e => e.getBoundingClientRect().right > panel.getBoundingClientRect().right + 1).map(e => e.tagName + '#' + e.id);
  return {W, H, boxes, outside, overlaps, clipped,
          scroll: document.documentElement.scrollWidth,
          layersOpen: !!document.querySelector('.leaflet-control-layers-expanded'),
          legendOpen: document.getElementById('legend').open,
          legendRows: document.querySelectorAll('#legend div').length};
}"""

# The report's layout: nothing but a table's scroll box is wider than the screen.
REPORT_LAYOUT_JS = """() => {
  const W = document.documentElement.clientWidth;
  const wide = [...document.querySelectorAll('h1, h2, p, ul, figure, img, .kpi, .scroll')]
    .filter(e => e.getBoundingClientRect().right > W + 1)
    .map(e => e.tagName + ' in ' + ((e.closest('section') || {}).id || 'header'));
  return {W, wide, scroll: document.documentElement.scrollWidth};
}"""


def _chromium() -> None:
    import os

    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is absent in CI: `make test` should have installed chromium")
        pytest.skip(f"{CHROMIUM} is absent: `make test` installs Debian's chromium (needs root)")


@pytest.fixture(scope="module")
def rendered(demo_run: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Reports]:  # fmt: skip
    root = demo_run[0]
    out = tmp_path_factory.mktemp("languages")
    return {
        code: make_reports(root, _region(), say=lambda _m: None, language=code, out=out / code)
        for code in LANGUAGES
    }


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    _chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def _names(root: Path) -> list[str]:
    """Strings from the data (names, holders, categories, ids, references), which stay
    as written in every language; longest first."""
    region = _region()
    found = {region.name, region.description, region.id}
    for layer in ("concessions", "protected_areas", "indigenous_lands", "settlements", "grievances"):  # fmt: skip
        for row in _rows(root, f"SELECT * FROM {layer} WHERE region = ?", [REGION]):
            found |= {v for v in row if isinstance(v, str)}
    found |= {r[0] for r in _rows(root, "SELECT alert_ref FROM alerts WHERE region = ?", [REGION])}
    found |= {r[0] for r in _rows(root, "SELECT model_id FROM models", [])}
    found |= {"demo-huepetuhe", "EPSG:32719"}
    return sorted((s for s in found if s and len(s) > 1), key=len, reverse=True)


def _strip(texts: list[str], names: list[str]) -> list[str]:
    out = []
    for t in texts:
        for name in names:
            t = t.replace(name, " ")
        out.append(t)
    return out


def _english_words(language: str) -> set[str]:
    """Words of the English messages that the language's translations never use: any of
    them on a page is English left over."""
    english, translated = set(), set()
    for m in read_catalog(language):
        if not m.id:
            continue
        for s in m.id if isinstance(m.id, tuple) else (m.id,):
            english |= set(WORD.findall(PLACEHOLDER.sub(" ", s).lower()))
        for s in m.string if isinstance(m.string, tuple) else (m.string,):
            translated |= set(WORD.findall(PLACEHOLDER.sub(" ", s).lower()))
    from babel import Locale  # the language's own month names ("out." is October in Portuguese)

    for width in ("abbreviated", "wide"):
        for month in Locale(language).months["format"][width].values():
            translated |= set(WORD.findall(month.lower()))
    return {w for w in english - translated if len(w) > 2} - NEUTRAL


def _popups(page: Any) -> list[str]:
    texts = []
    for layer in ("mining", "reveg", "alerts", "concessions", "protected_areas", "indigenous_lands", "settlements", "grievances"):  # fmt: skip
        texts.append(page.evaluate(f"window.asmwatch.openPopup('{layer}', 0)"))
    return texts


def _open_map(browser: Any, path: Path, size: tuple[int, int], shot: Path) -> dict[str, Any]:
    page = browser.new_page(viewport={"width": size[0], "height": size[1]})
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    try:
        page.goto(path.as_uri())
        page.wait_for_selector("body[data-ready='1']", timeout=30_000)
        layout = page.evaluate(MAP_LAYOUT_JS)
        page.screenshot(path=str(shot))
        seen = {
            "layout": layout,
            "images": page.text_content("#period-images"),
            "generated": page.text_content("#generated"),
            "stats": page.text_content("#period-stats"),
            "legend_title": page.text_content("#legend summary"),
        }
        if size[0] < 600:  # the folded legend opens inside the screen, beside the controls
            page.click("#legend summary")
            seen["opened"] = page.evaluate(MAP_LAYOUT_JS)
        seen["texts"] = page.evaluate(TEXTS_JS) + _popups(page)
    finally:
        page.close()
    seen["errors"] = errors
    seen["requests"] = [u for u in requests if not u.startswith("data:")]
    return seen


def _open_report(browser: Any, path: Path, size: tuple[int, int], shot: Path) -> dict[str, Any]:
    page = browser.new_page(viewport={"width": size[0], "height": size[1]})
    try:
        page.goto(path.as_uri())
        layout = page.evaluate(REPORT_LAYOUT_JS)
        page.screenshot(path=str(shot))
        return {
            "layout": layout,
            "texts": page.evaluate(TEXTS_JS),
            "summary": page.locator("#what-happened p").count(),
            "method": page.text_content("#method"),
            "h2": page.locator("h2").all_text_contents(),
        }
    finally:
        page.close()


def _not_blank(shot: Path, size: tuple[int, int]) -> None:
    from PIL import Image

    with Image.open(shot) as im:
        px = np.asarray(im.convert("RGB"))
    assert px.shape[:2] == (size[1], size[0]) and px.reshape(-1, 3).std(axis=0).mean() > 20


@pytest.mark.parametrize("language", LANGUAGES)
def test_each_language_at_a_desktop_and_a_phone(
    language: str, rendered: dict[str, Reports], browser: Any, demo_run: tuple[Path, str]
) -> None:
    root = demo_run[0]
    lang = Lang(language)
    out = rendered[language]
    assert out.language == language
    names = _names(root)
    leftovers = _english_words(language) if language != "en" else set()
    data = gather(root, _region())
    facts = {i.period: i for i in imagery_facts(root, data)}
    latest = facts["2021"]
    mining = _rows(root, "SELECT mining_ha FROM region_summary WHERE region = ? AND period = '2021'", [REGION])[0][0]  # fmt: skip
    for size in SIZES:
        tag = f"{language}-{size[0]}x{size[1]}"
        shot = out.directory / f"webmap-{tag}.png"
        seen = _open_map(browser, out.webmap_html, size, shot)
        _not_blank(shot, size)
        layout = seen["layout"]
        assert seen["errors"] == [] and seen["requests"] == [out.webmap_html.as_uri()], tag
        assert layout["outside"] == [] and layout["overlaps"] == [] and layout["clipped"] == [], (tag, layout)  # fmt: skip
        assert layout["scroll"] <= layout["W"], tag
        # The legend keys every layer and colour: 3 periods, 2 former, 3 alert, 5 context.
        assert layout["legendRows"] == 3 + 2 + 3 + 5, tag
        phone = size[0] < 600
        assert layout["layersOpen"] is not phone and layout["legendOpen"] is not phone, tag
        if phone:
            opened = seen["opened"]
            assert opened["legendOpen"] and opened["outside"] == [] and opened["overlaps"] == [], (tag, opened)  # fmt: skip
        # The period's image dates and the generation date, in the language's words.
        assert lang.date(latest.first) in seen["images"] and lang.date(latest.last) in seen["images"], (tag, seen["images"])  # fmt: skip
        assert lang._("Map made %(date)s by asmwatch", date="").split()[0] in seen["generated"]
        assert re.search(r"\b2026\b|\b20\d\d\b", seen["generated"])
        assert lang.num(mining) in seen["stats"], (tag, seen["stats"])
        assert seen["legend_title"] == lang._("Legend")
        english = {w for t in _strip(seen["texts"], names) for w in WORD.findall(t.lower())} & leftovers  # fmt: skip
        assert not english, f"{tag}: English on the map: {sorted(english)}"

        shot = out.directory / f"report-{tag}.png"
        page = _open_report(browser, out.report_html, size, shot)
        _not_blank(shot, size)
        assert page["layout"]["wide"] == [] and page["layout"]["scroll"] <= page["layout"]["W"], (tag, page["layout"])  # fmt: skip
        assert page["summary"] >= 5, tag
        assert lang._("What happened") in page["h2"] and lang._("Methods and limits") in page["h2"]
        assert lang.date(latest.first) in page["method"], tag
        text = " ".join(page["texts"])
        assert f"{lang.num(mining)} ha" in text, tag
        english = {w for t in _strip(page["texts"], names) for w in WORD.findall(t.lower())} & leftovers  # fmt: skip
        assert not english, f"{tag}: English in the report: {sorted(english)}"
    if language == "es":
        assert "Qué ocurrió" in out.report_html.read_text(encoding="utf-8")


class _Pseudo:
    """A pseudo-language: every message bracketed, so text outside brackets did not come
    through the catalogues."""

    def gettext(self, message: str) -> str:
        return f"⟦{message}⟧"

    def ngettext(self, singular: str, plural: str, n: int) -> str:
        return f"⟦{singular if n == 1 else plural}⟧"


def test_no_visible_text_bypasses_the_catalogues(
    demo_run: tuple[Path, str], browser: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipelines.i18n
    from pipelines.stages.reports import labels

    root = demo_run[0]
    monkeypatch.setattr(pipelines.i18n, "translations", lambda _code: _Pseudo())
    labels.cache_clear()  # the words of coded values are kept per language
    try:
        out = make_reports(root, _region(), say=lambda _m: None, language="en", out=tmp_path)
    finally:
        labels.cache_clear()
    texts = _open_map(browser, out.webmap_html, SIZES[0], tmp_path / "map.png")["texts"]
    texts += _open_report(browser, out.report_html, SIZES[0], tmp_path / "report.png")["texts"]
    assert sum("⟦" in t for t in texts) > 100
    # Dates are the language's own (CLDR, through Babel), not messages.
    from babel import Locale

    calendar = {"am", "pm"} | {
        w for width in ("abbreviated", "wide") for m in Locale("en").months["format"][width].values()
        for w in WORD.findall(m.lower())
    }  # fmt: skip
    bare = []
    for t in _strip(texts, _names(root)):
        while True:  # messages nest (an alert's words inside its sentence): innermost first
            shorter = re.sub(r"⟦[^⟦⟧]*⟧", " ", t)
            if shorter == t:
                break
            t = shorter
        words = {w for w in WORD.findall(t.lower())} - NEUTRAL - calendar
        if words:
            bare.append((t.strip()[:80], sorted(words)))
    assert bare == [], f"text not from the catalogues: {bare[:10]}"
