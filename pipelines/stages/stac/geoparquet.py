"""stac-geoparquet writing (rustac), shared by the scenes table and the embedded server."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from pipelines.infra.storage import atomic_path


def write_geoparquet(items: list[dict[str, Any]], target: Path) -> Path:
    """Write items as stac-geoparquet (atomically) with rustac."""
    import rustac

    if not items:
        raise ValueError(f"no items to write to {target}")

    async def _write(path: Path) -> None:
        await rustac.write(str(path), items, format="geoparquet")

    with atomic_path(target) as tmp:
        asyncio.run(_write(tmp))
    return target
