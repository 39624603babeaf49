"""asmwatch's EO library: pure, typed, no Dagster import.

The flow runs one way: regions -> STAC scenes -> composite -> probability -> sites ->
change -> risk -> reports. The folder shows it:

- ``regions.py``: the regions file (pydantic schema) that drives everything;
- ``thresholds.py``: every threshold a reader of the outputs meets, defined once;
- ``stages/``: one module or package per step, in flow order in its docstring;
- ``infra/``: what the stages stand on (the data layout, atomic writes, the grid and
  tiling, chunked tables, data contracts, retries, health checks);
- ``embedded/``: the simulated world and the STAC server the demo and tests use;
- ``sql/`` and ``templates/``: the risk SQL and the report templates (package data).

The model code is in ``ml/``; ``assets/`` wires the stages into Dagster.
"""

__version__ = "0.1.0"
