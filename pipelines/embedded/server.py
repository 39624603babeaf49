"""The embedded STAC API: a real stac-fastapi server on 127.0.0.1 over the embedded world.

The demo and the tests search it with pystac-client exactly as they search Earth Search.
It is stac-fastapi-geoparquet (bbox, datetime, CQL2 ``filter``, paging) over a
stac-geoparquet file written from the world's static catalog, with its rustac DuckDB
client pointed at the extension files shipped by the duckdb-extension-* packages, so its
first request never tries to download an extension.

``EmbeddedStacServer`` starts it in its own process group on a free port, waits until it
answers, and stops the whole group. Run ``python -m pipelines.embedded.server --help`` to
serve a world by hand.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

HOST = "127.0.0.1"
_SAFE_PATH = re.compile(r"^[A-Za-z0-9/._-]+$")


class StacServerError(RuntimeError):
    """The embedded STAC server could not start or answer."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


class EmbeddedStacServer:
    """A stac-fastapi-geoparquet process serving one stac-geoparquet file."""

    def __init__(self, geoparquet: Path, workdir: Path, *, startup_timeout_s: float = 60.0) -> None:
        self.geoparquet = Path(geoparquet)
        self.workdir = Path(workdir)
        self.startup_timeout_s = startup_timeout_s
        self.port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_path: Path | None = None
        self._safe_dir: Path | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise StacServerError("server not started")
        return f"http://{HOST}:{self.port}"

    def start(self) -> str:
        if not self.geoparquet.exists():
            raise StacServerError(f"cannot serve {self.geoparquet}: file not found")
        from pipelines.stages.catalog import extension_directory

        self.workdir.mkdir(parents=True, exist_ok=True)
        # The server's DuckDB client puts the file's absolute path into its SQL unquoted
        # (and unescaped as a glob): serve a copy from a folder whose path holds none of
        # the data root's characters (a quote, a bracket, a space).
        self._safe_dir = Path(tempfile.mkdtemp(prefix="asmwatch-stac-"))
        if not _SAFE_PATH.match(str(self._safe_dir)):
            shutil.rmtree(self._safe_dir, ignore_errors=True)
            raise StacServerError(
                f"the temporary folder {self._safe_dir} has characters the embedded STAC "
                "server cannot take in a path; set TMPDIR to a plain path (letters, digits, "
                "'/', '.', '_', '-')"
            )
        shutil.copyfile(self.geoparquet, self._safe_dir / "items.parquet")
        ext_dir = extension_directory(self._safe_dir / "duckdb_extensions")
        last_error = ""
        for _attempt in range(3):  # a free port can be taken between probe and bind
            self.port = _free_port()
            fd, log_name = tempfile.mkstemp(prefix="stac-server-", suffix=".log", dir=self.workdir)
            os.close(fd)
            self._log_path = Path(log_name)
            cmd = [
                sys.executable, "-m", "pipelines.embedded.server",
                "--geoparquet", "items.parquet",
                "--port", str(self.port),
                "--extension-dir", ext_dir.name,
                "--parent-pid", str(os.getpid()),
            ]  # fmt: skip
            pythonpath = os.pathsep.join(filter(None, (_package_root(), os.environ.get("PYTHONPATH"))))  # fmt: skip
            with self._log_path.open("wb") as log:
                self._proc = subprocess.Popen(
                    cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                    cwd=self._safe_dir, env={**os.environ, "PYTHONPATH": pythonpath},
                )  # fmt: skip
            try:
                self._wait_ready()
                return self.url
            except StacServerError as e:
                last_error = str(e)
                self.stop()
                if "address already in use" not in last_error.lower():
                    break
        raise StacServerError(last_error)

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            code = self._proc.poll()
            if code is not None:
                raise StacServerError(
                    f"embedded STAC server exited with code {code} before answering; "
                    f"its log ({self._log_path}) ends with:\n{self._log_tail()}"
                )
            try:
                r = requests.get(f"{self.url}/collections", timeout=2)
                if r.status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise StacServerError(
            f"embedded STAC server on {self.url} did not answer within "
            f"{self.startup_timeout_s:.0f} s; its log ends with:\n{self._log_tail()}"
        )

    def _log_tail(self, n: int = 20) -> str:
        if self._log_path is None or not self._log_path.exists():
            return "(no log)"
        lines = self._log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:]) or "(empty log)"

    def stop(self) -> None:
        """Stop the server's whole process group; safe to call twice."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=10)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        if self._log_path is not None and self._log_path.exists():
            self._log_path.unlink()
        if self._safe_dir is not None:
            shutil.rmtree(self._safe_dir, ignore_errors=True)
            self._safe_dir = None

    def __enter__(self) -> EmbeddedStacServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _package_root() -> str:
    """The folder that holds the ``pipelines`` package (the server runs from elsewhere)."""
    return str(Path(__file__).resolve().parents[2])


def watch_parent(parent_pid: int, interval_s: float = 1.0) -> None:
    """Exit this process when ``parent_pid`` is gone (a ``kill -9`` of the run that
    started it): the server never outlives the run and keeps no port open."""
    import threading

    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                # Orphaned: the copy it served is in its working directory, made for it.
                if Path.cwd().name.startswith("asmwatch-stac-"):
                    shutil.rmtree(Path.cwd(), ignore_errors=True)
                os._exit(0)
            time.sleep(interval_s)

    threading.Thread(target=watch, name="watch-parent", daemon=True).start()


def serve(geoparquet: Path, port: int, extension_dir: Path) -> None:
    """Run stac-fastapi-geoparquet in this process (the server subprocess's body)."""
    import uvicorn
    from rustac import DuckdbClient
    from stac_fastapi.geoparquet.api import create
    from stac_fastapi.geoparquet.settings import Settings

    client = DuckdbClient(
        extension_directory=extension_dir,
        extensions=["spatial", "icu", "parquet"],
        install_extensions=False,
    )
    settings = Settings(
        stac_fastapi_geoparquet_href=str(geoparquet),
        stac_fastapi_landing_id="asmwatch-embedded",
        stac_fastapi_title="asmwatch embedded STAC API",
        stac_fastapi_description="Simulated Sentinel-2 L2A scenes of asmwatch's embedded world",
    )
    api = create(settings=settings, duckdb_client=client)
    uvicorn.run(api.app, host=HOST, port=port, log_level="warning")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--geoparquet", type=Path, required=True, help="stac-geoparquet file to serve")
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--extension-dir", type=Path, required=True)
    ap.add_argument("--parent-pid", type=int, default=0, help="exit when this process is gone")
    args = ap.parse_args(argv)
    if args.parent_pid:
        watch_parent(args.parent_pid)
    serve(args.geoparquet, args.port, args.extension_dir)


if __name__ == "__main__":
    main()
