"""Frequency-domain noise filter for reconstructed DDPM features (paper §III-C, Fig. 4).

The DDPM sees a noisy image, so its features carry high-frequency noise. Following the paper
(inspired by MedSegDiff's FF-Parser) the features go to the frequency domain with an FFT, are
re-weighted there by a learnable map and a spatial attention over the spectrum, and come back
with the inverse FFT:

    F = rfft2(x);  G = W(f) * 2 sigmoid(conv([mean_c log|F|, max_c log|F|]));  y = irfft2(F * G)

W is a learnable complex gain per channel over normalised frequencies (rows -0.5..0.5, columns
0..0.5 cycles/pixel, `bins` steps per half-axis), sampled bilinearly at the exact frequencies of
any input's spectrum, so any h, w (odd ones too) work and DC / Nyquist line up at every size. At
initialisation W = 1 and the attention's last conv is zero (2 sigmoid(0) = 1), so the filter is
an exact pass-through: the teacher starts from unfiltered features and learns what to remove.

Teacher-only: torch.fft.rfft2/irfft2 do not export with the ONNX exporter. Only the distilled
student (a plain YOLOv5s) is ever exported, so this module never needs to; `teacher_only` marks it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from d3n.config import StrictModel


class FreqFilterConfig(StrictModel):
    bins: int = Field(8, ge=1, description="gain-map steps per half frequency axis (map: 2*bins+1 x bins+1)")
    attention: bool = Field(True, description="spatial attention over the log-magnitude spectrum (paper §III-C)")
    kernel: int = Field(7, ge=1, description="attention conv kernel (CBAM-style spatial attention)")


class FreqFilter(nn.Module):
    """x (B, C, H, W) -> filtered x, same shape and dtype. Pass-through at initialisation."""

    teacher_only = True  # torch.fft does not export to ONNX; the student never contains it

    def __init__(self, channels: int, config: FreqFilterConfig | None = None):
        super().__init__()
        self.config = config or FreqFilterConfig()
        b = self.config.bins
        # Complex gain as (real, imag) planes over rows = vertical freqs -0.5..0.5 and cols =
        # horizontal freqs 0..0.5 (rfft keeps the non-negative half); 1 + 0j = pass-through.
        gain = torch.zeros(2 * channels, 2 * b + 1, b + 1)
        gain[:channels] = 1.0
        self.gain = nn.Parameter(gain)
        self.channels = channels
        self.attn = None
        if self.config.attention:
            k = self.config.kernel
            self.attn = nn.Conv2d(2, 1, k, padding=k // 2)
            nn.init.zeros_(self.attn.weight)  # 2*sigmoid(0) = 1: pass-through at init
            nn.init.zeros_(self.attn.bias)

    def gain_map(self, h: int, w: int) -> torch.Tensor:
        """The complex gain (C, h, w//2+1) at the frequencies of an (h, w) map's rfft2, in its order."""
        dev = self.gain.device
        fy = torch.fft.fftfreq(h, device=dev) * 2.0  # -> [-1, 1): grid_sample's row coordinate
        fx = torch.fft.rfftfreq(w, device=dev) * 4.0 - 1.0  # [0, 0.5] -> [-1, 1]
        grid = torch.stack(torch.meshgrid(fx, fy, indexing="xy"), dim=-1)[None]  # (1, h, wf, 2)
        g = F.grid_sample(self.gain[None], grid.to(self.gain.dtype), mode="bilinear", align_corners=True)[0]
        return torch.complex(g[: self.channels], g[self.channels:])

    def spectrum_attention(self, spec: torch.Tensor) -> torch.Tensor:
        """Spatial attention in the frequency domain: (B, 1, h, wf) in (0, 2), 1 at init."""
        mag = torch.log1p(spec.abs())
        desc = torch.cat([mag.mean(1, keepdim=True), mag.amax(1, keepdim=True)], dim=1)
        desc = torch.fft.fftshift(desc, dim=-2)  # centre rows so the conv sees neighbouring freqs
        return torch.fft.ifftshift(2.0 * torch.sigmoid(self.attn(desc)), dim=-2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.channels:
            raise ValueError(f"FreqFilter expects (B, {self.channels}, H, W), got {tuple(x.shape)}")
        h, w = x.shape[-2:]
        # FFT in float32: half-precision cuFFT only takes power-of-two sizes.
        spec = torch.fft.rfft2(x.float(), norm="ortho")
        spec = spec * self.gain_map(h, w)
        if self.attn is not None:
            spec = spec * self.spectrum_attention(spec)
        return torch.fft.irfft2(spec, s=(h, w), norm="ortho").to(x.dtype)
