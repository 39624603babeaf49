"""A dask.distributed cluster of separate OS processes on 127.0.0.1, for the scale-out
benchmark and test: `dask scheduler` and `dask worker` started as the operator would,
joined through a scheduler file (no fixed ports)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType


class ProcessCluster:
    """``with ProcessCluster(tmp) as c: c.add_worker(); Client(scheduler_file=c.file)``."""

    def __init__(self, directory: Path, memory_limit: str = "3GiB") -> None:
        self.dir = directory
        self.file = directory / "scheduler.json"
        self.memory_limit = memory_limit
        self.procs: list[subprocess.Popen[bytes]] = []

    def _start(self, args: list[str], log: str) -> subprocess.Popen[bytes]:
        out = (self.dir / log).open("wb")
        role, *rest = args  # "scheduler" | "worker": distributed's own CLI modules
        path = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH")]))  # fmt: skip
        p = subprocess.Popen(
            [sys.executable, "-m", f"distributed.cli.dask_{role}", *rest], stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, "PYTHONPATH": path},
        )  # fmt: skip
        self.procs.append(p)
        return p

    def __enter__(self) -> ProcessCluster:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._start(
            ["scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
             "--scheduler-file", str(self.file)], "scheduler.log",
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while not self.file.exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"dask scheduler did not start: {(self.dir / 'scheduler.log').read_text()}")  # fmt: skip
            time.sleep(0.2)
        return self

    def add_worker(
        self, client: object | None = None, timeout_s: float = 60, extra: tuple[str, ...] = ()
    ) -> None:
        """Start one worker process (1 thread) and wait until the scheduler has it.

        ``extra``: more `dask worker` options, e.g. ``("--resources", "GPU=1")``.
        """
        n = sum(1 for _ in self.dir.glob("worker-*.log"))
        self._start(
            ["worker", "--scheduler-file", str(self.file), "--nthreads", "1",
             "--memory-limit", self.memory_limit, "--no-dashboard", "--host", "127.0.0.1",
             *extra],
            f"worker-{n}.log",
        )  # fmt: skip
        if client is not None:
            client.wait_for_workers(n + 1, timeout=timeout_s)  # type: ignore[attr-defined]

    def __exit__(self, *exc: tuple[type[BaseException] | None, BaseException | None, TracebackType | None]) -> None:  # fmt: skip
        for p in reversed(self.procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
