"""Property tests (Hypothesis) of open-ended periods: the series' periods are
contiguous, each starts the day after the last ends, the period containing a day
contains it, and a schedule's current period is that one whenever the file was read."""

from __future__ import annotations

import datetime as dt
import itertools

from hypothesis import given
from hypothesis import strategies as st

from pipelines.regions import parse_regions

DAY = st.dates(dt.date(2019, 1, 1), dt.date(2040, 12, 31))


def _region(periods: object) -> object:
    doc = {"regions": [{"id": "r", "aoi": {"bbox": [0, 0, 1, 1]}, "periods": periods}]}
    return parse_regions(doc).get("r")


@given(day=DAY, every=st.sampled_from(["year", "quarter"]), first=st.integers(2015, 2030))
def test_series_are_contiguous_and_contain_their_days(day: dt.date, every: str, first: int) -> None:  # fmt: skip
    start = str(first) if every == "year" else f"{first}Q1"
    region = _region({"from": start, "every": every})
    periods = region.periods_until(day)  # type: ignore[attr-defined]
    assert periods[0].id == start
    for a, b in itertools.pairwise(periods):
        assert b.start == a.end + dt.timedelta(days=1)
    current = region.current_period(day)  # type: ignore[attr-defined]
    if day >= periods[0].start:
        assert current.start <= day <= current.end and current == periods[-1]
        assert len(periods) == (day.year - first + 1) * (1 if every == "year" else 4) - (0 if every == "year" else 4 - (day.month - 1) // 3 - 1)  # fmt: skip
    else:
        assert current == periods[0] and len(periods) == 1
