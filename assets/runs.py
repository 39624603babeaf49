"""Runs that died with their process: found and marked failed, never STARTED forever.

``asmwatch demo`` and ``asmwatch backfill`` run jobs in their own process
(``execute_in_process``). A ``kill -9`` of that process leaves its run STARTED in the
Dagster instance, and no daemon watches such a run: run monitoring (on in the
``dagster.yaml`` asmwatch writes) covers only runs a run launcher started, the UI's.
So each such run carries the host and process id that runs it (``run_tags``), and every
``asmwatch`` command that opens the instance first marks failed the runs whose process
on this host is gone (``fail_dead_runs``), saying so.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

PID_TAG = "asmwatch/pid"
HOST_TAG = "asmwatch/host"


def run_tags() -> dict[str, str]:
    """Tags naming the process that runs a job in-process (this one)."""
    return {PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname()}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fail_dead_runs(instance: Any, say: Callable[[str], None] = print) -> list[str]:
    """Mark failed every unfinished run of this host whose process is gone; their ids."""
    import dagster as dg

    unfinished = [dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.STARTING]
    host = socket.gethostname()
    failed = []
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=unfinished)):
        pid, where = run.tags.get(PID_TAG), run.tags.get(HOST_TAG)
        if not pid or not pid.isdigit() or where != host or _alive(int(pid)):
            continue
        message = (
            f"the process that ran it (pid {pid} on {host}) is gone, killed or crashed; "
            "asmwatch marked the run failed. Re-run it; `asmwatch doctor` checks the files."
        )
        instance.report_run_failed(run, message=message)
        say(f"run {run.run_id} ({run.job_name}) was left STARTED by a dead process (pid {pid}): marked failed")  # fmt: skip
        failed.append(run.run_id)
    return failed
