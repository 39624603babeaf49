"""asmwatch's EO library: pure, typed, no Dagster import.

The flow runs one way: regions -> STAC scenes -> composite -> probability -> sites ->
change -> risk -> reports. Each stage is a module here (or in ml/); assets/ wires them.
"""

__version__ = "0.1.0"
