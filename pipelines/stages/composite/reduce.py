"""Reduce: the per-block median of the clear observations (SCL, and s2cloudless where
asked), in DN, and the indices.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from pipelines.stages.composite.inputs import (
    BAND_ROLES,
    L1C_ROLES,
    MASKED_SCL,
    OUTPUT_BANDS,
    REFLECTANCE_BANDS,
    CompositeError,
    Observation,
)
from pipelines.stages.composite.median import masked_median_dn, masked_median_float

if TYPE_CHECKING:
    import dask.array
    import xarray as xr


# --------------------------------------------------------------------------- reduce


def _dn_shifts(
    observations: Sequence[Observation], band: str
) -> tuple[list[int], float, float] | None:
    """Per-observation DN shifts onto the lowest offset, or None if not whole DN."""
    scales = {o.scale[band] for o in observations}
    if len(scales) != 1:
        return None
    scale = scales.pop()
    ref = min(o.offset[band] for o in observations)
    shifts = []
    for o in observations:
        s = (o.offset[band] - ref) / scale
        if abs(s - round(s)) > 1e-6:
            return None
        shifts.append(round(s))
    return shifts, scale, ref


_CLEAR = np.ones(256, dtype=bool)
_CLEAR[list(MASKED_SCL)] = False


def clear_mask(scl: npt.NDArray[np.uint8]) -> npt.NDArray[np.bool_]:
    """True where SCL says the observation is usable."""
    if scl.dtype == np.uint8:
        return _CLEAR[scl]  # a table lookup: ten times ``np.isin``'s speed
    return ~np.isin(scl, MASKED_SCL)


def _ratio(a: npt.NDArray[np.float32], b: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    with np.errstate(divide="ignore", invalid="ignore"):
        out = (a - b) / (a + b)
    out[~np.isfinite(out)] = np.nan
    return out.astype(np.float32)


def composite_block(
    scl: npt.NDArray[np.uint8],
    *bands: npt.NDArray[np.uint16],
    observations: Sequence[Observation],
    s2cloudless: bool = False,
) -> npt.NDArray[np.float32]:
    """One spatial block: (t, y, x) SCL and DN per band -> (10, y, x) output bands.

    With ``s2cloudless``, ``bands`` continues with the ten L1C bands (``L1C_ROLES``).
    """
    clear = clear_mask(scl)
    if s2cloudless:
        l1c_dn = bands[len(REFLECTANCE_BANDS) :]
        bands = bands[: len(REFLECTANCE_BANDS)]
        clear &= ~_s2cloudless_block(l1c_dn, observations)
    out = np.empty((len(OUTPUT_BANDS), *scl.shape[1:]), dtype=np.float32)
    for i, (name, dn) in enumerate(zip(REFLECTANCE_BANDS, bands, strict=True)):
        plan = _dn_shifts(observations, name)
        if plan is not None:
            shifts, scale, ref = plan
            try:
                med, _ = masked_median_dn(dn, clear, shifts)
                out[i] = med * np.float32(scale) + np.float32(ref)
                continue
            except OverflowError:
                pass
        scale_t = np.array([o.scale[name] for o in observations], np.float32)[:, None, None]
        offset_t = np.array([o.offset[name] for o in observations], np.float32)[:, None, None]
        med, _ = masked_median_float(dn * scale_t + offset_t, clear & (dn != 0))
        out[i] = med
    out[len(REFLECTANCE_BANDS)] = clear.sum(axis=0)
    b02, b03, b04, b08, b11, _ = out[: len(REFLECTANCE_BANDS)]
    j = len(REFLECTANCE_BANDS) + 1
    out[j] = _ratio(b08, b04)
    out[j + 1] = _ratio(b03, b11)
    out[j + 2] = _ratio(b11 + b04, b08 + b02)
    return out


def _s2cloudless_block(
    l1c_dn: Sequence[npt.NDArray[np.uint16]], observations: Sequence[Observation]
) -> npt.NDArray[np.bool_]:
    from pipelines.stages.composite.cloudmask import decimate, s2cloudless_mask

    small = [decimate(dn) for dn in l1c_dn]  # the classifier runs at a coarser step
    toa = np.empty((small[0].shape[0], len(L1C_ROLES), *small[0].shape[1:]), np.float32)
    for j, (role, dn) in enumerate(zip(L1C_ROLES, small, strict=True)):
        scale = np.array([o.l1c_scale.get(role, 1e-4) for o in observations], np.float32)
        offset = np.array([o.l1c_offset.get(role, 0.0) for o in observations], np.float32)
        toa[:, j] = dn * scale[:, None, None] + offset[:, None, None]
    available = np.ones(l1c_dn[0].shape, dtype=bool)
    for dn in l1c_dn:
        available &= dn != 0
    return s2cloudless_mask(toa, available)


def composite_array(
    ds: xr.Dataset, observations: Sequence[Observation], s2cloudless: bool = False
) -> dask.array.Array:
    """The lazy (10, y, x) float32 composite of a loaded stack."""
    import dask.array as da

    if ds.sizes["time"] != len(observations):
        raise CompositeError(
            f"stack has {ds.sizes['time']} time steps but {len(observations)} observations"
        )
    arrays: list[Any] = [ds["scl"].data]
    arrays += [ds[role].data for role in BAND_ROLES.values()]
    if s2cloudless:
        arrays += [ds[role].data for role in L1C_ROLES]
    args: list[Any] = []
    for a in arrays:
        args += [a, "tyx"]
    return da.blockwise(
        composite_block,
        "byx",
        *args,
        new_axes={"b": len(OUTPUT_BANDS)},
        concatenate=True,
        dtype=np.float32,
        observations=list(observations),
        s2cloudless=s2cloudless,
        meta=np.empty((0, 0, 0), dtype=np.float32),
    )


def naive_composite(ds: xr.Dataset, observations: Sequence[Observation]) -> xr.Dataset:
    """What a user writes by hand: reflectance, ``where(clear)``, ``median("time")``.

    The baseline of bench/composite.py; also a cross-check of ``composite_block``.
    """
    import xarray as xr

    clear = ~ds["scl"].isin(list(MASKED_SCL))
    out = {}
    for band, role in BAND_ROLES.items():
        scale = xr.DataArray([o.scale[band] for o in observations], dims="time")
        offset = xr.DataArray([o.offset[band] for o in observations], dims="time")
        dn = ds[role]
        refl = (dn.astype("float32") * scale + offset).where(dn != 0)
        out[band] = refl.where(clear).median("time")
    return xr.Dataset(out)
