"""ResVAE: the residual convolutional VAE that compresses one level of the feature repository
(paper §III-B, Fig. 3; ResNet basic blocks, KL weight 1 + MSE; 512 -> 64 channels at paper scale).

Channels are compressed, the spatial size is kept, so a latent map lines up pixel for pixel with
the raw one. Encoder and decoder each have two paths summed together: a linear 1x1 path and a
residual convolutional branch (ResNet blocks with 3x3 context). The linear paths can start from the
PCA solution (`init_linear`) with the branch's last conv zeroed, so training starts at PCA's
reconstruction and the ResNet branch learns what a per-pixel linear map cannot.

Features are centred per channel and divided by one global scale, a change of units that keeps
PCA's raw-space optimum and keeps the MSE and KL terms of comparable size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _groups(ch: int) -> int:
    for g in (8, 4, 2):
        if ch % g == 0:
            return g
    return 1


class ResBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with GroupNorm and SiLU, plus the identity."""

    def __init__(self, ch: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.GroupNorm(_groups(ch), ch), nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1),
            nn.GroupNorm(_groups(ch), ch), nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _branch(cin: int, hidden: int, cout: int, blocks: int) -> nn.Sequential:
    last = nn.Conv2d(hidden, cout, 1)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return nn.Sequential(nn.Conv2d(cin, hidden, 1), *[ResBlock(hidden) for _ in range(blocks)],
                         nn.GroupNorm(_groups(hidden), hidden), nn.SiLU(), last)


class ResVAE(nn.Module):
    def __init__(self, in_channels: int, latent_channels: int, hidden: int | None = None, blocks: int = 2):
        super().__init__()
        hidden = hidden or max(in_channels // 2, 2 * latent_channels, 16)
        self.hparams = {"in_channels": in_channels, "latent_channels": latent_channels,
                        "hidden": hidden, "blocks": blocks}
        self.register_buffer("mean", torch.zeros(in_channels))
        self.register_buffer("scale", torch.ones(()))
        self.enc_linear = nn.Conv2d(in_channels, latent_channels, 1)
        self.enc_branch = _branch(in_channels, hidden, latent_channels, blocks)
        self.enc_logvar = nn.Conv2d(in_channels, latent_channels, 1)
        nn.init.zeros_(self.enc_logvar.weight)
        nn.init.constant_(self.enc_logvar.bias, -4.0)  # start with little sampling noise
        self.dec_linear = nn.Conv2d(latent_channels, in_channels, 1)
        self.dec_branch = _branch(latent_channels, hidden, in_channels, blocks)

    @torch.no_grad()
    def set_normalisation(self, mean: torch.Tensor, scale: float) -> None:
        self.mean.copy_(mean)
        self.scale.fill_(float(scale))

    @torch.no_grad()
    def init_linear(self, components: torch.Tensor) -> None:
        """Start the linear paths at PCA: components (c, C), orthonormal rows, raw-space PCA."""
        c, ch = components.shape
        self.enc_linear.weight.copy_(components.view(c, ch, 1, 1))
        self.enc_linear.bias.zero_()
        self.dec_linear.weight.copy_(components.t().reshape(ch, c, 1, 1))
        self.dec_linear.bias.zero_()

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.view(1, -1, 1, 1)) / self.scale

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw features (N, C, H, W) -> mu, logvar (N, c, H, W)."""
        x = self._norm(x.float())
        return self.enc_linear(x) + self.enc_branch(x), self.enc_logvar(x).clamp(-12.0, 6.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (N, c, H, W) -> raw-scale features (N, C, H, W)."""
        z = z.float()
        y = self.dec_linear(z) + self.dec_branch(z)
        return y * self.scale + self.mean.view(1, -1, 1, 1)

    def loss(self, x: torch.Tensor, kl_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
        """MSE + kl_weight * KL (paper: KL scale 1), both summed over channels, averaged per pixel."""
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        y = self.dec_linear(z) + self.dec_branch(z)
        target = self._norm(x.float())
        mse = F.mse_loss(y, target, reduction="none").sum(1).mean()
        kl = (0.5 * (mu.pow(2) + logvar.exp() - logvar - 1.0)).sum(1).mean()
        total = mse + kl_weight * kl
        return total, {"loss": float(total.detach()), "mse": float(mse.detach()), "kl": float(kl.detach())}


class ResVAEEncoder(nn.Module):
    """Features -> latents (the posterior mean: compression is deterministic)."""

    def __init__(self, vae: ResVAE):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(x)[0]


class ResVAEDecoder(nn.Module):
    """Latents -> reconstructed features: the "feature mapping" of paper Fig. 5."""

    def __init__(self, vae: ResVAE):
        super().__init__()
        self.vae = vae

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z)
