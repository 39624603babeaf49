"""Progress lines: share done, elapsed and time left from the rate so far."""

from __future__ import annotations

from pipelines.infra.progress import Progress, duration


def test_progress_reports_time_left_from_the_rate() -> None:
    now = [100.0]
    lines: list[str] = []
    p = Progress("composite", 40, lines.append, unit="blocks written", clock=lambda: now[0])
    for done in range(1, 41):
        now[0] += 3.0  # 3 s a block
        p(done)
    assert len(lines) == 10  # about every tenth, and the last
    assert lines[0] == "composite: 4/40 blocks written (10 %), 12 s elapsed, about 1 min 48 s left"
    assert lines[-1] == "composite: 40/40 blocks written (100 %), 2 min 00 s elapsed"


def test_progress_small_totals_and_notes() -> None:
    lines: list[str] = []
    t = iter([0.0, 5.0, 9.0])
    p = Progress("training", 2, lines.append, unit="epochs", steps=20, clock=lambda: next(t))
    p(1, "val IoU 0.5")
    p(2)
    assert lines == [
        "training: 1/2 epochs (50 %), 5 s elapsed, about 5 s left; val IoU 0.5",
        "training: 2/2 epochs (100 %), 9 s elapsed",
    ]
    Progress("nothing", 0, lines.append)(0)  # no work, no line
    assert len(lines) == 2
    assert duration(3725) == "1 h 02 min" and duration(59.6) == "1 min 00 s"
