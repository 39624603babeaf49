"""The languages of the reports and the web map, and the formatting of their numbers.

Readers outside the team read a region's report and map in the region's language: a
community information centre in Kwale in English, an NGO in Madre de Dios in Spanish, a
mine's site managers in Mali in French, a team in Brazil in Portuguese. A region sets
``language`` in the regions file, or it follows the region's ``country``
(``COUNTRY_LANGUAGES``); see ``region_language``.

The texts are the project's messages in English (the message ids), marked in the code
with ``_()`` / ``ngettext()`` and in the templates with ``_()``; their translations are
gettext catalogues, ``pipelines/locale/<language>.po``, which any translator's tool
(Poedit, Weblate) edits. ``python -m pipelines.i18n update`` extracts the messages with
Babel into ``pipelines/locale/asmwatch.pot`` and merges them into each catalogue; a test
fails when a message is missing, untranslated or fuzzy in any catalogue, or when the
catalogues are stale. Numbers and dates are formatted by Babel from the CLDR data of the
language (``1,234.5`` in English, ``1.234,5`` in Spanish and Portuguese, ``1 234,5`` in
French).
"""

from __future__ import annotations

import datetime as dt
import functools
import io
import logging
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

log = logging.getLogger(__name__)

Language = Literal["en", "es", "fr", "pt"]
LANGUAGES: tuple[str, ...] = get_args(Language)
LOCALE_DIR = Path(__file__).resolve().parent / "locale"
DOMAIN = "asmwatch"

#: The language reports are read in, per country (ISO 3166-1 alpha-2), for the countries
#: where ASM is watched. A country whose language has no catalogue yet maps to it anyway
#: (Suriname: Dutch); ``region_language`` then says so and uses English.
COUNTRY_LANGUAGES: dict[str, str] = {
    # South America
    "PE": "es", "BO": "es", "CO": "es", "EC": "es", "VE": "es", "AR": "es", "CL": "es",
    "BR": "pt", "GY": "en", "SR": "nl", "GF": "fr",
    # Central America and Mexico
    "MX": "es", "GT": "es", "HN": "es", "NI": "es", "PA": "es", "CR": "es",
    # West and Central Africa
    "ML": "fr", "GN": "fr", "SN": "fr", "BF": "fr", "CI": "fr", "NE": "fr", "TD": "fr",
    "CM": "fr", "CF": "fr", "CD": "fr", "CG": "fr", "GA": "fr", "TG": "fr", "BJ": "fr",
    "MR": "fr", "GH": "en", "SL": "en", "LR": "en", "NG": "en", "GM": "en", "GW": "pt",
    # East and Southern Africa
    "KE": "en", "TZ": "en", "UG": "en", "ET": "am", "SD": "ar", "ZW": "en", "ZM": "en",
    "MZ": "pt", "AO": "pt", "MG": "fr", "RW": "en", "BI": "fr", "ZA": "en",
    # Asia and Oceania
    "ID": "id", "PH": "en", "MM": "my", "PG": "en", "MN": "mn",
}  # fmt: skip


class I18nError(ValueError):
    """A language asmwatch has no catalogue for, or a broken catalogue."""


@functools.cache
def countries() -> dict[str, str]:
    """ISO 3166-1 alpha-2 code -> the country's English name (CLDR, through Babel)."""
    from babel import Locale

    return {k: v for k, v in Locale("en").territories.items() if len(k) == 2 and k.isalpha()}


def region_language(language: str | None, country: Iterable[str]) -> tuple[str, str]:
    """The language of a region's reports, and why: ``language`` when the region sets
    it, else its first country's (``COUNTRY_LANGUAGES``), else English. The reason is
    said in the reports' log and metadata: a country whose language asmwatch cannot
    write yet, or a region with neither setting, gets English and a reason saying so."""
    if language is not None:
        return language, "set by the region's `language`"
    codes = list(country)
    if not codes:
        return "en", "English: the region sets neither `language` nor `country`"
    first = codes[0]
    native = COUNTRY_LANGUAGES.get(first)
    if native in LANGUAGES:
        return native, f"the language of {countries().get(first, first)} (`country: {first}`)"
    from babel import Locale

    what = f"{Locale('en').languages.get(native, native)} ({native})" if native else "its language"
    return "en", (
        f"English: asmwatch has no {what} translation for {countries().get(first, first)} "
        f"yet; set `language` ({', '.join(LANGUAGES)}) to choose"
    )


@functools.cache
def translations(language: str) -> Any:
    """The gettext translations of ``language`` (English: the messages themselves),
    compiled in memory from ``pipelines/locale/<language>.po``. A message the catalogue
    lacks or has not translated is logged as a warning (it would show in English)."""
    import gettext

    if language not in LANGUAGES:
        raise I18nError(f"unknown language {language!r}: asmwatch writes {', '.join(LANGUAGES)}")
    if language == "en":
        return gettext.NullTranslations()
    from babel.messages.mofile import write_mo
    from babel.support import Translations

    catalog = read_catalog(language)
    missing = untranslated(catalog)
    if missing:
        log.warning(
            "the %s catalogue %s has %d untranslated message(s), shown in English: %s",
            language, catalog_path(language), len(missing), "; ".join(missing[:5]),
        )  # fmt: skip
    buf = io.BytesIO()
    write_mo(buf, catalog)
    buf.seek(0)
    return Translations(buf, domain=DOMAIN)


def catalog_path(language: str) -> Path:
    return LOCALE_DIR / f"{language}.po"


def read_catalog(language: str) -> Any:
    from babel.messages.pofile import read_po

    path = catalog_path(language)
    if not path.exists():
        raise I18nError(f"{path} is missing: the {language} catalogue of asmwatch's messages")
    with path.open("rb") as f:
        return read_po(f, locale=language, domain=DOMAIN)


def untranslated(catalog: Any) -> list[str]:
    """Messages of ``catalog`` that would show in English: empty or fuzzy."""
    out = []
    for m in catalog:
        if not m.id:
            continue
        strings = m.string if isinstance(m.string, (list, tuple)) else [m.string]
        if m.fuzzy or not all(strings):
            out.append(m.id if isinstance(m.id, str) else m.id[0])
    return out


@dataclass(frozen=True)
class Lang:
    """One language's messages and formats: what the reports write with."""

    code: str

    def _(self, message: str, **values: Any) -> str:
        """``message`` translated, then ``%(name)s`` filled from ``values``."""
        text = translations(self.code).gettext(message)
        return text % values if values else text

    def ngettext(self, singular: str, plural: str, n: int, **values: Any) -> str:
        """The singular or plural of the message for ``n`` (the language's plural rule),
        with ``%(num)s`` the formatted ``n`` and ``values`` filled in."""
        text = translations(self.code).ngettext(singular, plural, n)
        return text % {"num": self.num(n, 0), **values}

    def num(self, value: Any, digits: int = 1) -> str:
        """A number with ``digits`` decimals, grouped as the language writes it; ``-``
        for a missing value."""
        from babel.numbers import format_decimal

        if value is None or (isinstance(value, float) and value != value):
            return "-"
        if isinstance(value, float) and value in (float("inf"), float("-inf")):
            return "-"
        pattern = "#,##0" + ("." + "0" * digits if digits > 0 else "")
        return format_decimal(value, format=pattern, locale=self.code)

    def percent(self, share: Any, digits: int = 0) -> str:
        """A share (0-1) as a percentage: ``12 %`` in French, ``12%`` in English."""
        from babel import Locale
        from babel.numbers import format_percent

        if share is None:
            return "-"
        pattern = Locale.parse(self.code).percent_formats[None].pattern  # "#,##0 %" in French
        if digits > 0:
            pattern = pattern.replace("#,##0", "#,##0." + "0" * digits, 1)
        return format_percent(share, format=pattern, locale=self.code)

    def date(self, value: Any, form: str = "medium") -> str:
        """A date (``date`` or ISO text) as the language writes it: ``3 Jun 2021``."""
        from babel.dates import format_date

        if value is None:
            return "-"
        if isinstance(value, str):
            value = dt.date.fromisoformat(value[:10])
        elif isinstance(value, dt.datetime):
            value = value.date()
        return format_date(value, form, locale=self.code)

    def datetime(self, value: dt.datetime) -> str:
        """A time stamp in UTC, date and minutes, as the language writes it."""
        from babel import Locale
        from babel.dates import format_date, format_time

        value = value.astimezone(dt.UTC)
        date = format_date(value.date(), "medium", locale=self.code)
        time = format_time(value, "short", tzinfo=dt.UTC, locale=self.code)
        pattern = Locale.parse(self.code).datetime_formats["medium"]  # "{1}, {0}"
        return str(pattern).replace("{1}", date).replace("{0}", time) + " UTC"

    def name(self) -> str:
        """The language's own name: ``español``."""
        from babel import Locale

        return str(Locale(self.code).get_display_name(self.code))


# ---------------------------------------------------------------- catalogue upkeep

#: Where the messages are: the report code (Python) and its templates (Jinja2).
SOURCES = (("pipelines/stages/reports.py", "python"), ("pipelines/templates/report.html.j2", "jinja2"))  # fmt: skip
KEYWORDS = {"_": None, "ngettext": (1, 2)}


def extract(root: Path | None = None) -> Any:
    """Every message of ``SOURCES`` as a Babel catalogue (what ``asmwatch.pot`` holds)."""
    from babel.messages.catalog import Catalog
    from babel.messages.extract import extract as extract_file
    from jinja2.ext import babel_extract

    root = root or Path(__file__).resolve().parents[1]
    catalog = Catalog(project="asmwatch", domain=DOMAIN, charset="utf-8")
    for rel, method in SOURCES:
        how: Any = babel_extract if method == "jinja2" else method
        with (root / rel).open("rb") as f:
            for lineno, message, comments, context in extract_file(
                how, f, keywords=KEYWORDS, comment_tags=("TRANSLATORS:",),
                options={"trimmed": "true"} if method == "jinja2" else {},
            ):  # fmt: skip
                catalog.add(message, None, [(rel, lineno)], auto_comments=comments, context=context)
    return catalog


def update() -> list[str]:
    """Rewrite ``asmwatch.pot`` from the sources and merge it into each catalogue
    (new messages empty, removed ones dropped); returns what each catalogue lacks."""
    from babel.messages.pofile import write_po

    template = extract()
    with (LOCALE_DIR / f"{DOMAIN}.pot").open("wb") as f:
        write_po(f, template, width=100, sort_output=False, include_lineno=False)
    out = []
    for language in LANGUAGES:
        if language == "en":
            continue
        catalog = read_catalog(language)
        catalog.update(template, no_fuzzy_matching=True)
        catalog.obsolete.clear()
        with catalog_path(language).open("wb") as f:
            write_po(
                f, catalog, width=100, sort_output=False, ignore_obsolete=True, include_lineno=False
            )
        missing = untranslated(catalog)
        out.append(f"{language}: {len(catalog)} messages, {len(missing)} to translate")
    translations.cache_clear()
    return out


if __name__ == "__main__":  # pragma: no cover - a maintainer's command
    if sys.argv[1:] != ["update"]:
        sys.exit("usage: python -m pipelines.i18n update")
    print("\n".join(update()))
