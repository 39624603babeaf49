"""The embedded world: a simulated Sentinel-2 region served over a real STAC API.

``simulator`` builds a region's world (COGs and STAC items in Earth Search's schema);
``server`` is the stac-fastapi server on 127.0.0.1 that serves it; ``source`` builds a
world once and starts its server wherever a region says ``source: embedded`` (the demo,
the tests). Nothing outside this package knows the world is simulated.
"""
