"""Decoder activations of the DDPM UNet at the detector's P3/P4/P5 resolutions (paper Fig. 3).

diffusers' UNet2DModel has no feature output, so forward hooks catch each up block's output
*before* its upsampler (the block's last, most refined map at that resolution: a pre-hook on
`upsamplers[0]`, or the block's own output for the last block, which has none). For a DDPM input
of size S, p3/p4/p5 are the last such maps of size S, S/2, S/4: strides 8/16/32 of a detector
input 8x larger (64 -> 512), the scales the paper keeps unchanged for the FPN (§III-B).

Noise is seeded from (image id, timestep), so features of one image never depend on which
other images share its batch, and a rebuild is bit-identical.
"""

from __future__ import annotations

import hashlib

import torch

from d3n.errors import ConfigError

LEVEL_DIVISORS = {"p3": 1, "p4": 2, "p5": 4}  # map size = S / divisor


def noise_seed(image_id: str, t: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{image_id}:{int(t)}".encode()).digest()[:8], "little") >> 1


def seeded_noise(image_ids: list[str], t: int, shape: tuple[int, ...]) -> torch.Tensor:
    # CPU generators on purpose: the same noise whatever device the UNet runs on (moved by the caller)
    gens = [torch.Generator().manual_seed(noise_seed(i, t)) for i in image_ids]
    return torch.stack([torch.randn(shape, generator=g) for g in gens])


class DecoderFeatures:
    """Hooks a UNet2DModel's up blocks and returns the p3/p4/p5 maps of one noised forward pass."""

    def __init__(self, unet: torch.nn.Module, scheduler, size: int):
        self.unet, self.scheduler, self.size = unet, scheduler, size
        self._caught: dict[str, torch.Tensor] = {}
        names = self._install_hooks()
        self.hooks = self._pick_levels(names)

    def _install_hooks(self) -> list[str]:
        names = []
        for i, block in enumerate(self.unet.up_blocks):
            ups = getattr(block, "upsamplers", None)
            if ups:
                name = f"up_blocks.{i}.upsamplers.0:input"
                ups[0].register_forward_pre_hook(self._catch_input(name))
            else:
                name = f"up_blocks.{i}:output"
                block.register_forward_hook(self._catch_output(name))
            names.append(name)
        return names

    def _catch_input(self, name: str):
        def hook(_module, inputs):
            self._caught[name] = inputs[0]
        return hook

    def _catch_output(self, name: str):
        def hook(_module, _inputs, output):
            self._caught[name] = output
        return hook

    def _pick_levels(self, names: list[str]) -> dict[str, str]:
        """Level -> hook name: the last hooked map of each level's size (one dry forward pass)."""
        with torch.no_grad():
            x = torch.zeros(1, 3, self.size, self.size, device=self._device())
            self.unet(x, torch.tensor([0], device=x.device))
        sizes = {n: int(self._caught[n].shape[-1]) for n in names}
        picked = {}
        for level, div in LEVEL_DIVISORS.items():
            match = [n for n in names if sizes[n] == self.size // div]
            if not match:
                raise ConfigError(f"UNet has no decoder map of size {self.size // div} for {level} "
                                  f"(hooked sizes: {sizes})")
            picked[level] = match[-1]
        self.channels = {lv: int(self._caught[n].shape[1]) for lv, n in picked.items()}
        self._caught.clear()
        return picked

    def _device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def shapes(self) -> dict[str, tuple[int, int, int]]:
        return {lv: (self.channels[lv], self.size // d, self.size // d) for lv, d in LEVEL_DIVISORS.items()}

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, image_ids: list[str], timesteps: list[int]) -> dict[str, torch.Tensor]:
        """images (N, 3, S, S) in [-1, 1] -> {level: float32 (N, T, C, H, W)} on the CPU.

        x_t = sqrt(a_bar_t) x_0 + sqrt(1 - a_bar_t) eps (paper Eq. 2), one UNet pass per t."""
        dev = self._device()
        x0 = images.to(dev)
        per_t = {lv: [] for lv in self.hooks}
        for t in timesteps:
            eps = seeded_noise(image_ids, t, tuple(x0.shape[1:])).to(dev)
            tt = torch.full((x0.shape[0],), int(t), dtype=torch.long, device=dev)
            xt = self.scheduler.add_noise(x0, eps, tt)
            self.unet(xt, tt)
            for lv, name in self.hooks.items():
                per_t[lv].append(self._caught[name].float().cpu())
            self._caught.clear()
        return {lv: torch.stack(maps, dim=1) for lv, maps in per_t.items()}
