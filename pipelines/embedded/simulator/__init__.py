"""The embedded Sentinel-2 world: a seeded simulator of L2A scenes for demo regions.

It writes COGs and STAC items in the Earth Search v1 schema at a region's real UTM grid,
so the demo and the tests follow the production code path (STAC API, pystac-client,
normalisation, odc-stac) with no network.
"""

from pipelines.embedded.simulator.world import WorldInfo, load_items, simulate_world, spec_hash

__all__ = ["WorldInfo", "load_items", "simulate_world", "spec_hash"]
