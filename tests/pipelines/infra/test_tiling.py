"""Property tests (Hypothesis) of the tiling arithmetic: for any raster size, tile size
and halo, the tiles' cores cover every pixel exactly once and each read window is its
core grown by the halo, clipped to the raster. (tests/test_tile_invariance.py runs the stages
at several tile sizes and checks their outputs are equal.)"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.infra.tiling import (
    BLOCK,
    MIN_TILE,
    Tiling,
    TilingError,
    check_tile_size,
    overview_levels,
)

SIZES = st.sampled_from([64, 128, 256, 512, 1024, 2048])


@settings(max_examples=300, deadline=None)
@given(height=st.integers(1, 5000), width=st.integers(1, 5000), size=SIZES, halo=st.integers(0, 80))  # fmt: skip
def test_cores_cover_every_pixel_once_and_reads_add_the_clipped_halo(
    height: int, width: int, size: int, halo: int
) -> None:
    tiling = Tiling(height, width, size, halo)
    tiles = tiling.tiles()
    assert len(tiles) == tiling.n_tiles == tiling.rows * tiling.cols
    assert sum(t.core.shape[0] * t.core.shape[1] for t in tiles) == height * width
    rows = sorted({(t.core.row0, t.core.row1) for t in tiles})
    cols = sorted({(t.core.col0, t.core.col1) for t in tiles})
    # the cores' edges chain from 0 to the raster's edge with no gap and no overlap
    assert rows[0][0] == 0 and rows[-1][1] == height and all(a[1] == b[0] for a, b in itertools.pairwise(rows))  # fmt: skip
    assert cols[0][0] == 0 and cols[-1][1] == width and all(a[1] == b[0] for a, b in itertools.pairwise(cols))  # fmt: skip
    for t in tiles:
        c, r = t.core, t.read
        assert 0 < c.shape[0] <= size and 0 < c.shape[1] <= size
        assert (c.row0 % size, c.col0 % size) == (0, 0), "cores start on the tile grid"
        assert (r.row0, r.col0) == (max(0, c.row0 - halo), max(0, c.col0 - halo))
        assert (r.row1, r.col1) == (min(height, c.row1 + halo), min(width, c.col1 + halo))
        rows_in, cols_in = c.within(r)
        block = np.zeros(r.shape)
        assert block[rows_in, cols_in].shape == c.shape


@given(height=st.integers(1, 300), width=st.integers(1, 300), size=SIZES)
def test_a_raster_smaller_than_a_tile_is_one_tile(height: int, width: int, size: int) -> None:
    if height <= size and width <= size:
        assert Tiling(height, width, size).n_tiles == 1


@given(st.integers(-10, 20_000))
def test_tile_sizes_line_up_with_the_cog_blocks(size: int) -> None:
    usable = size >= MIN_TILE and (size % BLOCK == 0 or BLOCK % size == 0)
    if usable:
        assert check_tile_size(size) == size
    else:
        with pytest.raises(TilingError, match=f"tile size {size} px"):
            check_tile_size(size)


@given(height=st.integers(1, 200_000), width=st.integers(1, 200_000), smallest=st.integers(1, 1024))  # fmt: skip
def test_overviews_halve_until_the_smaller_side_fits(
    height: int, width: int, smallest: int
) -> None:
    levels = overview_levels(height, width, smallest)
    sides = [min(height, width)]
    for _ in range(levels):
        sides.append((sides[-1] + 1) // 2)
    assert sides[-1] <= smallest, "enough levels"
    assert all(side > smallest for side in sides[:-1]), "no level more than needed"
