"""The thresholds a reader of asmwatch's outputs meets, defined once.

The stages and the SQL take them from here (the SQL as bound parameters), the report and
the asset descriptions format them from here, and the "Thresholds" table of
docs/data-dictionary.md is rendered from ``THRESHOLDS`` (``python -m
pipelines.thresholds`` prints it; a test fails when the page and this module disagree).
A run may override the ones that are settings (``mmu_ha`` of ``asm_sites``,
``alert_distance_m`` and ``min_alert_ha`` of the risk assets); these are the defaults.
The tables record the values a run used (the sites and alerts files' key-value
metadata), and the report states those.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Smallest ASM site kept, hectares (50 pixels of 10 m).
MMU_HA = 0.5
#: Formerly mined land whose composite's mean NDVI reaches this is re-vegetating.
NDVI_RECOVERED = 0.35
#: New ASM this close to a large-scale mining concession raises an alert, metres.
ALERT_DISTANCE_M = 5000.0
#: Change areas smaller than this raise no alert, hectares (the minimum mapping unit).
MIN_ALERT_HA = MMU_HA
#: A concession alert is ``high`` within this distance (``critical`` inside), metres.
ALERT_HIGH_WITHIN_M = 1000.0
#: New ASM inside a protected area or indigenous land: ``critical`` from this area,
#: ``high`` from ``ALERT_HIGH_HA``, ``medium`` below, hectares.
ALERT_CRITICAL_HA = 5.0
ALERT_HIGH_HA = 1.0
#: Alerts a period lists in the report and on the map, most severe first (the rest
#: are counted there, and all stay in the ``alerts`` table).
MAX_ALERTS_LISTED = 25
#: Concession risk bands: the score (0-100) from which each band starts; below the
#: last, ``low``.
RISK_BAND_CRITICAL = 75.0
RISK_BAND_HIGH = 50.0
RISK_BAND_MEDIUM = 25.0
#: The concession risk score's parts and the most each can add (they sum to 100).
RISK_COMPONENT_MAX: dict[str, float] = {
    "inside": 30.0, "proximity": 20.0, "new": 20.0, "growth": 10.0, "people": 10.0,
    "grievances": 10.0,
}  # fmt: skip


@dataclass(frozen=True)
class Threshold:
    name: str  # the constant here
    value: float
    unit: str
    meaning: str
    setting: str = ""  # where a run can change it


THRESHOLDS: tuple[Threshold, ...] = (
    Threshold(
        "MMU_HA",
        MMU_HA,
        "ha",
        "minimum mapping unit: smaller sites are dropped",
        "`mmu_ha` of `asm_sites`",
    ),
    Threshold(
        "NDVI_RECOVERED",
        NDVI_RECOVERED,
        "NDVI",
        "formerly mined land at or above this mean NDVI is `revegetating`, below it `abandoned`",
    ),
    Threshold(
        "ALERT_DISTANCE_M",
        ALERT_DISTANCE_M,
        "m",
        "new ASM within this distance of a concession raises an alert",
        "`alert_distance_m` of the risk assets",
    ),
    Threshold(
        "MIN_ALERT_HA",
        MIN_ALERT_HA,
        "ha",
        "smaller change areas raise no alert",
        "`min_alert_ha` of the risk assets",
    ),
    Threshold(
        "ALERT_HIGH_WITHIN_M",
        ALERT_HIGH_WITHIN_M,
        "m",
        "a concession alert is `high` within this distance, `critical` inside the concession, `medium` beyond",
    ),
    Threshold(
        "ALERT_CRITICAL_HA",
        ALERT_CRITICAL_HA,
        "ha",
        "new ASM inside a protected area or indigenous land: `critical` from this area",
    ),
    Threshold("ALERT_HIGH_HA", ALERT_HIGH_HA, "ha", "... `high` from this area, `medium` below"),
    Threshold(
        "MAX_ALERTS_LISTED",
        MAX_ALERTS_LISTED,
        "alerts",
        "alerts a period lists in the report and on the map (most severe, then largest); "
        "the rest are counted there and stay in the table",
        "`max_alerts` of the risk assets",
    ),
    Threshold(
        "RISK_BAND_CRITICAL",
        RISK_BAND_CRITICAL,
        "score",
        "concession risk band `critical` from this score (0-100)",
    ),
    Threshold("RISK_BAND_HIGH", RISK_BAND_HIGH, "score", "band `high` from this score"),
    Threshold(
        "RISK_BAND_MEDIUM", RISK_BAND_MEDIUM, "score", "band `medium` from this score; `low` below"
    ),
    *(
        Threshold(
            f"RISK_COMPONENT_MAX[{k}]",
            v,
            "score",
            f"the most the `score_{k}` part of a concession's risk score adds (parts sum to 100)",
        )
        for k, v in RISK_COMPONENT_MAX.items()
    ),
)
assert sum(RISK_COMPONENT_MAX.values()) == 100, "the risk score's parts must sum to 100"


def sql_parameters() -> dict[str, float]:
    """The thresholds the SQL of sql/ binds (``$alert_high_within_m``, ...)."""
    return {
        "alert_high_within_m": ALERT_HIGH_WITHIN_M,
        "alert_critical_ha": ALERT_CRITICAL_HA,
        "alert_high_ha": ALERT_HIGH_HA,
        "band_critical": RISK_BAND_CRITICAL,
        "band_high": RISK_BAND_HIGH,
        "band_medium": RISK_BAND_MEDIUM,
        **{f"max_{k}": v for k, v in RISK_COMPONENT_MAX.items()},
    }


def number(value: float) -> str:
    """A threshold as a reader writes it: ``0.5``, ``5000``, ``0.35``."""
    return f"{value:g}" if value < 1e6 else f"{value:.0f}"


def markdown_table() -> str:
    """The "Thresholds" table of docs/data-dictionary.md."""
    rows = ["| threshold | value | meaning | set by |", "|---|---|---|---|"]
    for t in THRESHOLDS:
        unit = "" if t.unit in ("NDVI", "score", "alerts") else f" {t.unit}"
        rows.append(f"| `{t.name}` | {number(t.value)}{unit} | {t.meaning} | {t.setting or 'code'} |")  # fmt: skip
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
