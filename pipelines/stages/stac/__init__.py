"""STAC: search any STAC API for a region and period, and normalise what comes back."""

from pipelines.stages.stac.normalize import (
    REQUIRED_ROLES,
    SCL_CLASSES,
    NormalizeResult,
    Scene,
    normalize_item,
    normalize_items,
)
from pipelines.stages.stac.search import SearchResult, search_scenes

__all__ = [
    "REQUIRED_ROLES",
    "SCL_CLASSES",
    "NormalizeResult",
    "Scene",
    "SearchResult",
    "normalize_item",
    "normalize_items",
    "search_scenes",
]
