"""Dagster resources: settings (data root, regions file), STAC access and dask.

``StacResource`` hands an asset the STAC API URL for a region: the preset or URL from
the regions file, or, for ``source: embedded``, a local stac-fastapi server it starts on
demand (first use in a run), on a free port on 127.0.0.1, and stops with the run.
``DaskResource`` hands out a dask ``Client``: to the cluster at ``scheduler_address``
when one is given (scale-out: dask-gateway, Kubernetes, Coiled, ``dask scheduler``), else
to a LocalCluster it starts on first use and closes with the run.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import dagster as dg
from pydantic import PrivateAttr

from pipelines.embedded.server import EmbeddedStacServer
from pipelines.embedded.source import start_server
from pipelines.infra.storage import data_root
from pipelines.regions import Region, RegionsConfig, load_regions

if TYPE_CHECKING:
    from distributed import Client, LocalCluster


#: Op retries for steps that talk to remote services (STAC APIs, object stores, a dask
#: scheduler): up to 3 more tries, 30 s, 60 s, 120 s apart (+-50 % jitter). Failures that
#: retrying cannot fix (bad input, a broken contract) raise ``dg.Failure(allow_retries=False)``
#: and are not retried.
NETWORK_RETRY = dg.RetryPolicy(
    max_retries=3, delay=30, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS
)

F = TypeVar("F", bound=Callable[..., Any])


def fail_fast(fn: F) -> F:
    """Retries only for transient faults: anything else becomes
    ``dg.Failure(allow_retries=False)``, whatever started the run.

    Every asset body is wrapped. A network fault (a connection refused, reset or timed
    out, an HTTP 429 or 5xx, a lost dask worker: ``pipelines.infra.errors.transient_cause``)
    is raised as it is, so the asset's retry policy (``NETWORK_RETRY`` on the assets
    that talk to remote services) tries again. A full disk, a read-only data root or a
    permission error ends the step at once, naming the cause and the path (GDAL would
    say "TIFFAppendToStrip: Write error"); so does any other error (bad input, a broken
    contract, a bug), which would fail the same way on every try.
    """
    from pipelines.infra.errors import deterministic_cause, transient_cause

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (dg.Failure, dg.RetryRequested):
            raise
        except Exception as e:
            settings = kwargs.get("settings")
            root = settings.root() if isinstance(settings, AsmwatchSettings) else None
            cause = deterministic_cause(e, root)
            if cause is None:
                if transient_cause(e) is not None:
                    raise  # the retry policy, where the asset has one, tries again
                raise dg.Failure(
                    allow_retries=False,
                    description=(
                        f"{fn.__name__}: {type(e).__name__}: {e} "
                        "(not retried: it would fail the same way)"
                    ),
                ) from e
            raise dg.Failure(
                allow_retries=False,
                description=(
                    f"{fn.__name__}: {cause}. Retrying cannot fix this: free space, or "
                    "make the data root writable, then re-run."
                ),
            ) from e

    return cast(F, wrapper)


class AsmwatchSettings(dg.ConfigurableResource):
    """Where the data root and the regions file are (empty: the environment's defaults)."""

    data_root: str = ""  # default: $ASMWATCH_DATA or ./data
    regions_file: str = ""  # default: $ASMWATCH_REGIONS or regions.yaml
    # Processing tile edge, px, of every raster stage after the composite (a multiple or
    # a divisor of 512); 0: 1024 (8192 for CUDA inference). Outputs do not depend on it.
    tile_px: int = 0

    def root(self) -> Path:
        return data_root(self.data_root or None)

    def regions(self) -> RegionsConfig:
        return load_regions(self.regions_file or None)


class StacResource(dg.ConfigurableResource):
    """STAC API access; starts the embedded server for embedded regions.

    ``pc_subscription_key`` is a credential: give it only as
    ``dg.EnvVar("PC_SDK_SUBSCRIPTION_KEY")`` (the definitions do when that variable is
    set), so the UI and the run config show the variable's name, never its value.
    """

    startup_timeout_s: float = 60.0
    pc_subscription_key: str = ""
    _servers: dict[str, EmbeddedStacServer] = PrivateAttr(default_factory=dict)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self._servers = {}

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        self.stop_all()

    def url_for(self, region: Region, root: Path, log: Any = None) -> str:
        if region.source != "embedded":
            url = region.stac_url
            assert url is not None
            return url
        if region.id not in self._servers:
            say = log.info if log is not None else print
            self._servers[region.id] = start_server(
                root, region, say=say, startup_timeout_s=self.startup_timeout_s
            )
        return self._servers[region.id].url

    def stop_all(self) -> None:
        for server in self._servers.values():
            server.stop()
        self._servers = {}


class DaskResource(dg.ConfigurableResource):
    """A dask cluster for the raster work: an existing one, or a LocalCluster.

    The defaults suit one machine: one worker process per core, one thread each (GDAL
    decoding and the median kernel release the GIL but fight over memory bandwidth),
    and a 4 GiB memory limit per worker, which the composite's chunking stays within.
    """

    scheduler_address: str = ""  # e.g. tcp://scheduler:8786; empty: start a LocalCluster
    n_workers: int = 0  # 0: one per CPU core
    threads_per_worker: int = 1
    memory_limit: str = "4GiB"  # per worker
    processes: bool = True  # False: threads in this process (tests, debugging)
    chunk_size: int = 1024  # composite block edge, pixels
    dashboard: bool = False  # serve the dask dashboard on 127.0.0.1 (needs bokeh)
    connect_timeout_s: float = 30.0  # how long to try an existing scheduler
    _client: Any = PrivateAttr(default=None)
    _cluster: Any = PrivateAttr(default=None)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self._client = None
        self._cluster = None

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        self.close()

    def client(self, log: Any = None) -> Client:
        """The client, connecting or starting the cluster on first use."""
        if self._client is not None:
            return self._client
        from distributed import Client, LocalCluster

        say = log.info if log is not None else print
        if self.scheduler_address:
            say(f"dask: connecting to the cluster at {self.scheduler_address}")
            try:
                self._client = Client(self.scheduler_address, timeout=f"{self.connect_timeout_s}s")
            except OSError as e:
                raise dg.Failure(
                    description=(
                        f"dask: cannot reach the scheduler at {self.scheduler_address!r} "
                        f"(resource 'dask', field scheduler_address): {e}"
                    )
                ) from e
        else:
            import os

            from pipelines.infra.tiling import worker_environ

            n = self.n_workers or os.cpu_count() or 1
            with worker_environ():
                cluster: LocalCluster = LocalCluster(
                    n_workers=n,
                    threads_per_worker=self.threads_per_worker,
                    memory_limit=self.memory_limit,
                    processes=self.processes,
                    # Workers in processes talk TCP on loopback only; threads: inproc://.
                    host="127.0.0.1" if self.processes else None,
                    dashboard_address="127.0.0.1:0" if self.dashboard else None,
                    scheduler_kwargs=None if self.dashboard else {"dashboard": False},
                )
            self._cluster = cluster
            self._client = Client(cluster)
            say(
                f"dask: started a LocalCluster with {n} worker(s) x "
                f"{self.threads_per_worker} thread(s), {self.memory_limit} each"
                f"{' (threads in-process)' if not self.processes else ''}"
            )
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
        if self._cluster is not None:
            self._cluster.close()
        self._client = None
        self._cluster = None


class TorchResource(dg.ConfigurableResource):
    """Where and how the model runs: CUDA when present (``device: auto``), else CPU."""

    device: str = "auto"  # auto | cuda | cpu
    tile: int = 0  # largest inference tile edge, px (multiple of 32); 0: 256 CPU, 2048 GPU
    overlap: int = 32  # pixels neighbouring tiles share at least, blended
    batch: int = 0  # tiles per forward pass; 0: 16 CPU, 6 GPU
    dtype: str = "float16"  # CUDA weights and activations: float16 | bfloat16 | float32
    # CUDA: torch.compile mode: "" eager; "default" (about 15 s to compile, 920 Mpx/s on
    # an H100); "max-autotune-no-cudagraphs" (about 3.5 min of autotuning the first time
    # on a machine, 20 s once inductor's cache under <data root>/cache/inductor holds it;
    # 1,000 Mpx/s). docs/performance.md has the figures.
    compile: str = "max-autotune-no-cudagraphs"
    retrain: bool = False  # train even when a model for the same inputs is registered
