"""The reports' languages: catalogues, the region's language, number and date formats.

The rendered report and web map in each language are checked in
tests/pipelines/stages/test_report_languages.py (Chromium, at a desktop's and a phone's
size).
"""

from __future__ import annotations

import datetime as dt
import re

import pytest
import yaml

from pipelines.i18n import (
    LANGUAGES,
    I18nError,
    Lang,
    extract,
    read_catalog,
    region_language,
    translations,
    untranslated,
)
from pipelines.regions import RegionsError, parse_regions

PLACEHOLDER = re.compile(r"%\((\w+)\)s")


def _ids(catalog: object) -> set[object]:
    return {m.id for m in catalog if m.id}  # type: ignore[attr-defined]


@pytest.mark.parametrize("language", [lang for lang in LANGUAGES if lang != "en"])
def test_every_message_is_translated_with_its_placeholders(language: str) -> None:
    """Each catalogue holds exactly the messages of the code and templates (none stale,
    none missing), each translated and not fuzzy, every plural form filled, and each
    translation keeps the message's placeholders (a dropped %(ha)s would lose a figure)."""
    source = extract()
    catalog = read_catalog(language)
    assert len(source) > 150
    missing = _ids(source) - _ids(catalog)
    stale = _ids(catalog) - _ids(source)
    assert not missing and not stale, (
        f"{language}.po is not current: run `python -m pipelines.i18n update` and translate "
        f"(missing {sorted(map(str, missing))[:5]}, stale {sorted(map(str, stale))[:5]})"
    )
    assert untranslated(catalog) == []
    for m in catalog:
        if not m.id:
            continue
        ids = m.id if isinstance(m.id, tuple) else (m.id,)
        strings = m.string if isinstance(m.string, tuple) else (m.string,)
        want = set(PLACEHOLDER.findall(ids[-1])) - {"num"}
        for s in strings:
            got = set(PLACEHOLDER.findall(s)) - {"num"}
            assert got == want, f"{language}: {ids[0]!r} -> {s!r}"
            assert s.count("%") == s.count("%("), f"{language}: a stray % in {s!r}"
    assert list(catalog.check()) == []  # Babel's own checks (python-format, plural forms)


def test_messages_are_looked_up_and_formatted() -> None:
    assert Lang("es")._("Legend") == "Leyenda"
    assert Lang("fr")._("Legend") == "Légende"
    assert Lang("pt")._("Legend") == "Legenda"
    assert Lang("en")._("Legend") == "Legend"
    assert Lang("en").ngettext("%(num)s alert", "%(num)s alerts", 1) == "1 alert"
    assert Lang("en").ngettext("%(num)s alert", "%(num)s alerts", 1200) == "1,200 alerts"
    assert Lang("es").ngettext("%(num)s alert", "%(num)s alerts", 2) == "2 alertas"
    # French counts 0 as singular.
    assert Lang("fr").ngettext("%(num)s alert", "%(num)s alerts", 0) == "0 alerte"
    with pytest.raises(I18nError, match="unknown language 'de'"):
        translations("de")


def test_numbers_percentages_and_dates_follow_the_language() -> None:
    assert [Lang(c).num(1234.56) for c in ("en", "es", "fr", "pt")] == [
        "1,234.6", "1.234,6", "1\u202f234,6", "1.234,6",
    ]  # fmt: skip
    assert Lang("es").num(301.45, 2) == "301,45" and Lang("en").num(None) == "-"
    assert Lang("en").num(float("nan")) == "-" and Lang("fr").num(7, 0) == "7"
    assert Lang("en").percent(0.973) == "97%" and Lang("fr").percent(0.973) == "97\u00a0%"
    day = dt.date(2021, 6, 3)
    assert Lang("en").date(day) == "Jun 3, 2021"
    assert Lang("es").date("2021-06-03") == "3 jun 2021"
    assert Lang("fr").date(day) == "3 juin 2021"
    assert Lang("pt").date(day, "long") == "3 de junho de 2021"
    stamp = dt.datetime(2026, 12, 2, 9, 5, tzinfo=dt.UTC)
    assert Lang("en").datetime(stamp) == "Dec 2, 2026, 9:05\u202fAM UTC"
    assert Lang("fr").datetime(stamp) == "2 déc. 2026, 09:05 UTC"


def test_the_language_follows_the_country_unless_set() -> None:
    assert region_language(None, ["PE"]) == ("es", "the language of Peru (`country: PE`)")
    assert region_language(None, ["ML", "GN"])[0] == "fr"
    assert region_language(None, ["BR"])[0] == "pt"
    assert region_language(None, ["KE"])[0] == "en"
    assert region_language("pt", ["PE"]) == ("pt", "set by the region's `language`")
    # A country whose language asmwatch cannot write yet: English, and the reason says so.
    lang, why = region_language(None, ["SR"])
    assert lang == "en" and "no Dutch (nl) translation for Suriname" in why and "`language`" in why
    lang, why = region_language(None, [])
    assert lang == "en" and "neither `language` nor `country`" in why


def _regions(extra: str) -> str:
    return (
        "regions:\n  - id: r\n    aoi: {bbox: [-70.6, -13.0, -70.5, -12.9]}\n"
        f"    periods: [2021]\n{extra}"
    )


def test_country_and_language_in_the_regions_file() -> None:
    config = parse_regions(yaml.safe_load(_regions("    country: [SN, ML]\n")))
    region = config.get("r")
    assert region.country == ("SN", "ML") and region.language == "fr"
    assert "Senegal" in region.language_reason
    assert (
        parse_regions(yaml.safe_load(_regions("    country: PE\n    language: en\n")))
        .get("r")
        .language
        == "en"
    )
    assert parse_regions(yaml.safe_load(_regions(""))).get("r").language == "en"
    with pytest.raises(RegionsError) as e:
        parse_regions(yaml.safe_load(_regions("    country: [PE, Peru, pe]\n    language: de\n")))
    text = str(e.value)
    assert "regions[0] (r).country: unknown country code(s) 'Peru', 'pe': use ISO 3166-1 alpha-2" in text  # fmt: skip
    assert "regions[0] (r).language: 'de': reports are written in en, es, fr, pt" in text
