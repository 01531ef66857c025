"""PCA over channels: the compression baseline of the paper's Table III ablation (73.2 vs 77.8 mAP).

Every pixel of every feature map is one C-dimensional sample; the top c principal directions
give a fixed linear 1x1 map to c channels and back (including the mean), the same latent shape
as the ResVAE. Moments are accumulated shard by shard in float64, so the repository is never
loaded whole.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import nn


class ChannelMoments:
    """Running sum and scatter of C-channel pixel vectors."""

    def __init__(self, channels: int):
        self.n = 0
        self.sum = np.zeros(channels, np.float64)
        self.outer = np.zeros((channels, channels), np.float64)

    def update(self, maps: np.ndarray) -> None:
        """maps (..., C, H, W)."""
        ch = maps.shape[-3]
        x = np.moveaxis(np.asarray(maps, np.float64).reshape(-1, ch, maps.shape[-2] * maps.shape[-1]), 1, 2)
        x = x.reshape(-1, ch)
        self.n += x.shape[0]
        self.sum += x.sum(0)
        self.outer += x.T @ x

    def mean(self) -> np.ndarray:
        return self.sum / self.n

    def covariance(self) -> np.ndarray:
        m = self.mean()
        return self.outer / self.n - np.outer(m, m)


def fit_pca(batches: Iterable[np.ndarray], channels: int, latent: int) -> dict[str, np.ndarray]:
    """-> mean (C,), components (c, C) orthonormal rows, explained variance (c,), total variance."""
    mom = ChannelMoments(channels)
    for b in batches:
        mom.update(b)
    if mom.n == 0:
        raise ValueError("PCA fit on no samples")
    evals, evecs = np.linalg.eigh(mom.covariance())
    order = np.argsort(evals)[::-1][:latent]
    return {"mean": mom.mean().astype(np.float32), "components": evecs[:, order].T.astype(np.float32),
            "explained": evals[order].astype(np.float32), "total": np.float32(evals.sum())}


def _fixed_conv(weight: torch.Tensor, bias: torch.Tensor) -> nn.Conv2d:
    """A 1x1 conv holding a fitted affine map (out, in) + bias."""
    conv = nn.Conv2d(weight.shape[1], weight.shape[0], 1)
    with torch.no_grad():
        conv.weight.copy_(weight[..., None, None])
        conv.bias.copy_(bias)
    return conv


class PCAEncoder(nn.Module):
    """z = W (x - mean) as a 1x1 conv."""

    def __init__(self, mean: torch.Tensor, components: torch.Tensor):
        super().__init__()
        self.conv = _fixed_conv(components, -(components @ mean))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.float())


class PCADecoder(nn.Module):
    """x = W^T z + mean as a 1x1 conv."""

    def __init__(self, mean: torch.Tensor, components: torch.Tensor):
        super().__init__()
        self.conv = _fixed_conv(components.t(), mean)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.conv(z.float())
