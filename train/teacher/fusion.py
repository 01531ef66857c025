"""Dynamic cross-fusion of detector and DDPM features (paper §III-C, Eqs. 4-5, Fig. 6, Tables I-III).

Inputs at one pyramid level: detector features X (B, Cx, h, w) and reconstructed DDPM features
D (B, Cd, h, w), already resampled to X's h, w. D is (optionally) noise-filtered in the frequency
domain (train/teacher/freqfilter.py), projected to Cx by a 1x1 conv and normalised (LayerNorm over
channels, Table I "norm"). Then, in the paper's "dynamic" mode:

    cross = MHA_4(q = X, k = v = D')          (Eqs. 4-5, detector features are the query)
    self_x = MHA_4(X, X),  self_d = MHA_4(D', D')   (Table I "dual self-att")
    fused = softmax(logits) . [cross, self_x, self_d]   (Table I "weighted sum", Fig. 11)
    out = X + proj(fused)                      (Table I "residual")

Attention cost: queries stay at full resolution, keys/values are average-pooled to at most
`kv_size` x `kv_size` tokens (16x16 by default), so a P3 map of a 512 px image (64x64 = 4096
queries) attends over 256 tokens instead of 4096.

Zero-initialised output: with `residual` on, `proj` starts at zero, so out == X and the teacher
starts exactly as the plain detector; the DDPM path grows from there (like a zero-conv), which
keeps early training as stable as the baseline's.

Every component has a switch so Tables I-III rerun by one flag; `mode` swaps the whole fusion for
the Table II alternatives, each exactly the operation the row names (no hidden residual unless
`residual: true` is asked for): "concat" (concat + 1x1 conv), "sum" (X + D'), "weighted_sum"
(learnable softmax weights over X and D'). The tables' columns map onto the config as:

    Table I   dual self-att -> use_self_x + use_self_d; weighted sum -> learn_weights;
              residual -> residual; norm -> norm (all off = plain cross-attention, row 1)
    Table II  mode: concat | sum | weighted_sum | dynamic
    Table III noise filter -> use_filter; without dynamic cross-fusion -> another `mode`

Table I row 4 (weighted sum + residual, no dual self-attention): Fig. 11 weighs three features,
Cross, Det and DDPM. Without self-attention on X the Det feature is the detector's residual X
itself, so the learnable weights run over (cross, X): a real choice between the cross branch and
the detector features, whose weights receive gradient (with only the cross branch, a softmax over
one entry would be the constant 1 and the row would equal "residual only").
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from d3n.config import StrictModel
from d3n.train.teacher.freqfilter import FreqFilter, FreqFilterConfig

BRANCHES = ("cross", "det", "ddpm")  # order of branch_weights(): cross-attn, self-attn on X, on D


class FusionConfig(StrictModel):
    mode: Literal["dynamic", "concat", "sum", "weighted_sum"] = "dynamic"  # paper: dynamic (Table II)
    # off: the control "distillation alone" -- no DDPM branch at all (no filter, projection, cross- or
    # DDPM self-attention); the teacher keeps its other branches and schedule but sees no DDPM feature
    use_ddpm: bool = True
    heads: int = Field(4, ge=1)  # paper Eq. 4: 4 heads
    use_filter: bool = True  # frequency noise filter on D (Table III)
    use_cross: bool = True  # cross-attention branch, q = X, k/v = D (Eqs. 4-5)
    use_self_x: bool = True  # self-attention on the detector features (Table I dual self-att)
    use_self_d: bool = True  # self-attention on the DDPM features (Table I dual self-att)
    learn_weights: bool = True  # learnable weighted sum of branches (Table I); off = equal weights
    residual: bool | None = None  # residual of X (Table I); default: on for dynamic, off for Table II rows
    norm: bool = True  # normalise D before attention (Table I)
    kv_size: int = Field(16, ge=1)  # keys/values pooled to at most kv_size x kv_size tokens
    filter: FreqFilterConfig = Field(default_factory=FreqFilterConfig)

    @model_validator(mode="after")
    def _some_branch(self) -> FusionConfig:
        if self.residual is None:
            self.residual = self.mode == "dynamic"
        if self.mode == "dynamic" and not (self.use_cross or self.use_self_x or self.use_self_d):
            raise ValueError("dynamic fusion needs at least one of use_cross, use_self_x, use_self_d")
        if not self.use_ddpm and (self.mode != "dynamic" or not (self.use_self_x or self.learn_weights and self.residual)):
            raise ValueError("use_ddpm: false keeps the dynamic fusion's detector branch: needs mode dynamic "
                             "with use_self_x (or learn_weights and residual)")
        return self


def _tokens(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).transpose(1, 2)  # (B, C, h, w) -> (B, h*w, C)


def _map(t: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], h, w)


class PooledAttention(nn.Module):
    """Multi-head attention with full-resolution queries and keys/values pooled to <= kv_size^2."""

    def __init__(self, channels: int, heads: int, kv_size: int):
        super().__init__()
        self.kv_size = kv_size
        self.mha = nn.MultiheadAttention(channels, heads, batch_first=True)

    def forward(self, query: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        h, w = query.shape[-2:]
        if source.shape[-2] > self.kv_size or source.shape[-1] > self.kv_size:
            size = (min(source.shape[-2], self.kv_size), min(source.shape[-1], self.kv_size))
            source = F.adaptive_avg_pool2d(source, size)
        kv = _tokens(source)
        out, _ = self.mha(_tokens(query), kv, kv, need_weights=False)
        return _map(out, h, w)


class ChannelNorm(nn.Module):
    """LayerNorm over channels at every location (the paper normalises D before attention)."""

    def __init__(self, channels: int):
        super().__init__()
        self.ln = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class CrossFusion(nn.Module):
    """fuse(X (B, Cx, h, w), D (B, Cd, h, w)) -> (B, Cx, h, w). See the module docstring."""

    def __init__(self, det_channels: int, ddpm_channels: int, config: FusionConfig | None = None):
        super().__init__()
        cfg = self.config = config or FusionConfig()
        cx = det_channels
        if cfg.mode == "dynamic" and cx % cfg.heads:
            raise ValueError(f"detector channels {cx} not divisible by {cfg.heads} attention heads")
        ddpm = cfg.use_ddpm
        self.filter = FreqFilter(ddpm_channels, cfg.filter) if cfg.use_filter and ddpm else None
        self.proj_d = nn.Conv2d(ddpm_channels, cx, 1) if ddpm else None
        self.norm_d = (ChannelNorm(cx) if cfg.norm else nn.Identity()) if ddpm else None
        if cfg.mode == "dynamic":
            # Table I row 4: without self-attention on X, the weighted Det feature is X itself
            self.det_is_x = cfg.residual and cfg.learn_weights and not cfg.use_self_x
            uses = (cfg.use_cross and ddpm, cfg.use_self_x, cfg.use_self_d and ddpm)
            self.cross, self.self_x, self.self_d = (
                PooledAttention(cx, cfg.heads, cfg.kv_size) if on else None for on in uses)
            self.active = (uses[0], uses[1] or self.det_is_x, uses[2])
        elif cfg.mode == "weighted_sum":
            self.active = (False, True, True)
        elif cfg.mode == "concat":
            self.mix = nn.Conv2d(2 * cx, cx, 1)
            if not cfg.residual:  # start as "take X": identity on the X half, zero on the D half
                with torch.no_grad():
                    self.mix.weight.zero_()
                    self.mix.weight[:, :cx, 0, 0].copy_(torch.eye(cx))
                    self.mix.bias.zero_()
        self.logits = None
        if cfg.mode in ("dynamic", "weighted_sum") and cfg.learn_weights:
            self.logits = nn.Parameter(torch.zeros(3))  # softmax -> equal weights at init
        self.out = None
        if cfg.residual:
            self.out = nn.Conv2d(cx, cx, 1)
            nn.init.zeros_(self.out.weight)  # out == X at init: the teacher starts as the detector
            nn.init.zeros_(self.out.bias)

    def branch_weights(self) -> torch.Tensor | None:
        """Weights of (cross, det, ddpm), summing to 1 (Fig. 11); None for concat (no weights)."""
        mode = self.config.mode
        if mode == "concat":
            return None
        if mode == "sum":
            return torch.tensor([0.0, 0.5, 0.5])
        mask = torch.tensor(self.active, device=self._device())
        logits = self.logits if self.logits is not None else torch.zeros(3, device=mask.device)
        return torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=0)

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    def ddpm_branch(self, d: torch.Tensor) -> torch.Tensor:
        """Filter (Fig. 4), project to Cx and normalise the DDPM features (Table I norm)."""
        if self.filter is not None:
            d = self.filter(d)
        return self.norm_d(self.proj_d(d))

    def _dynamic(self, x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        w = self.branch_weights().to(x.dtype)
        fused = 0
        if self.cross is not None:
            fused = fused + w[0] * self.cross(x, d)  # q = detector, k/v = DDPM (Eqs. 4-5)
        if self.self_x is not None:
            fused = fused + w[1] * self.self_x(x, x)
        elif self.det_is_x:
            fused = fused + w[1] * x
        if self.self_d is not None:
            fused = fused + w[2] * self.self_d(d, d)
        return fused

    def forward(self, x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        if d.shape[0] != x.shape[0] or d.shape[-2:] != x.shape[-2:]:
            raise ValueError(f"DDPM features {tuple(d.shape)} must match detector features "
                             f"{tuple(x.shape)} in batch and spatial size (resample them first)")
        d = self.ddpm_branch(d).to(x.dtype) if self.proj_d is not None else None
        mode = self.config.mode
        if mode == "dynamic":
            fused = self._dynamic(x, d)
        elif mode == "concat":
            fused = self.mix(torch.cat([x, d], dim=1))
        elif mode == "sum":
            fused = x + d
        else:  # weighted_sum
            w = self.branch_weights().to(x.dtype)
            fused = w[1] * x + w[2] * d
        return x + self.out(fused) if self.out is not None else fused
