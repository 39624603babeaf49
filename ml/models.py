"""The detectors: a U-Net (segmentation-models-pytorch) and a spectral-index baseline.

The U-Net takes the nine feature channels of ``ml.features`` and returns one logit per
pixel. It is built with ``encoder_weights=None``: ImageNet weights would be a runtime
download, and RGB-trained filters do not fit nine reflectance/index channels anyway.
A ResNet-18 encoder with a slim decoder keeps CPU training to minutes and GPU inference
fast; the architecture is saved with the weights, so a checkpoint rebuilds itself.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from torch import nn

from ml.features import FEATURE_BANDS


@dataclass(frozen=True)
class UnetSpec:
    encoder: str = "resnet18"
    decoder_channels: tuple[int, ...] = (128, 64, 32, 16, 16)
    in_channels: int = len(FEATURE_BANDS)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UnetSpec:
        return cls(d["encoder"], tuple(d["decoder_channels"]), int(d["in_channels"]))


def build_unet(spec: UnetSpec | None = None) -> nn.Module:
    import segmentation_models_pytorch as smp

    spec = spec or UnetSpec()
    model: nn.Module = smp.Unet(
        encoder_name=spec.encoder,
        encoder_weights=None,  # never "imagenet": that downloads at runtime
        in_channels=spec.in_channels,
        classes=1,
        decoder_channels=spec.decoder_channels,
    )
    return model


def shift_logits(model: nn.Module, offset: float) -> None:
    """Add ``offset`` to every output logit, in the segmentation head's bias (so the
    saved checkpoint carries it): a prior correction, logit(new) - logit(trained)."""
    import torch

    head: Any = model.segmentation_head
    conv = head[0]
    with torch.no_grad():
        conv.bias += offset


def index_baseline(features: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Mining probability from the indices alone, no training: bare or muddy ground.

    Mining sediment and its ponds are where vegetation is gone (low NDVI) and the soil is
    bare (BSI high) or the water is turbid and small. A soft score from NDVI and BSI:
    ``p = sigmoid((0.35 - NDVI) / 0.05) * sigmoid((BSI + 0.15) / 0.05)``. It cannot tell
    a mining pond from a river or a road from a mine; that is the U-Net's job.
    """
    ndvi = features[FEATURE_BANDS.index("NDVI")]
    bsi = features[FEATURE_BANDS.index("BSI")]
    with np.errstate(over="ignore", invalid="ignore"):
        p = 1 / (1 + np.exp(-(0.35 - ndvi) / 0.05)) / (1 + np.exp(-(bsi + 0.15) / 0.05))
    return np.where(np.isfinite(p), p, np.nan).astype(np.float32)
