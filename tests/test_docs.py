"""The numbers the docs, the report and the asset descriptions state agree with the code:
every threshold is defined once, in pipelines/thresholds.py."""

from __future__ import annotations

import re
from pathlib import Path

from pipelines import thresholds as th

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))


def test_the_thresholds_table_is_the_modules() -> None:
    page = (ROOT / "docs" / "data-dictionary.md").read_text()
    m = re.search(r"<!-- thresholds: begin -->\n(.*?)\n<!-- thresholds: end -->", page, re.S)
    assert m is not None, "docs/data-dictionary.md lost its thresholds table"
    assert m.group(1) == th.markdown_table(), "run `python -m pipelines.thresholds` and paste"


def _ndvi_values(text: str) -> list[float]:
    return [float(v) for v in re.findall(r"NDVI[^.\n]{0,30}?(?:>=|≥|&ge;)\s*([0-9.]+[0-9])", text)]


def test_every_stated_revegetation_threshold_is_the_codes() -> None:
    from assets.change import asm_change

    texts = {p.name: p.read_text() for p in DOCS}
    texts["asm_change description"] = asm_change.specs_by_key[next(iter(asm_change.specs_by_key))].description or ""  # fmt: skip
    found = {name: _ndvi_values(text) for name, text in texts.items()}
    assert found["asm_change description"] == [th.NDVI_RECOVERED]
    assert found["data-dictionary.md"], "the data dictionary states the threshold"
    wrong = {name: v for name, vals in found.items() for v in vals if v != th.NDVI_RECOVERED}
    assert not wrong, wrong


def test_risk_doc_states_the_codes_bands_and_alert_rules() -> None:
    risk = (ROOT / "docs" / "risk.md").read_text()
    n = th.number
    assert (
        f"low below {n(th.RISK_BAND_MEDIUM)}, medium from {n(th.RISK_BAND_MEDIUM)}, "
        f"high from {n(th.RISK_BAND_HIGH)} and critical from {n(th.RISK_BAND_CRITICAL)}"
    ) in risk
    assert f"high within {n(th.ALERT_HIGH_WITHIN_M / 1000)} km" in risk
    assert f"critical from {n(th.ALERT_CRITICAL_HA)} ha inside, high from {n(th.ALERT_HIGH_HA)} ha" in risk  # fmt: skip
    assert f"({n(th.ALERT_DISTANCE_M / 1000)} km by default" in risk
    assert f"({n(th.MIN_ALERT_HA)} ha by default" in risk


def test_the_report_prints_the_thresholds_from_the_code() -> None:
    from pipelines.stages.reports import templates, threshold_texts

    source = (ROOT / "pipelines" / "templates" / "report.html.j2").read_text()
    # Messages take the thresholds as values (translated around them, never inside).
    assert "mmu=t.mmu_ha" in source and "reaches %(ndvi)s" in source and "ndvi=t.ndvi_recovered" in source  # fmt: skip
    assert "critical=t.alert_critical_ha" in source and "critical=t.band_critical" in source
    assert not _ndvi_values(source.replace("%(ndvi)s", "")), "a literal NDVI threshold"
    assert "0.5 ha" not in source
    text = templates().from_string("{{ t.mmu_ha }} ha, NDVI {{ t.ndvi_recovered }}").render(t=threshold_texts())  # fmt: skip
    assert text == f"{th.number(th.MMU_HA)} ha, NDVI {th.number(th.NDVI_RECOVERED)}"
