"""A trained defect generator and its three samplers, all with classifier-free guidance
(eps = eps_null + w (eps_class - eps_null)):

- `sdedit`: a real crop noised to `strength` x T and denoised back (DDIM), conditioned on its class;
- `inpaint`: RePaint (diffusers' RePaintScheduler): the region where `keep` is 0 generated, the
  rest re-noised from the original at every step, with resampling jumps;
- `blend`: blended diffusion (DDIM) with a soft mask `alpha`: 1 in the defect, falling to 0 across
  a transition band, 0 outside; outside is the original re-noised to each step.

Each works on (B, 3, S, S) tensors in [-1, 1] at the generator's size; `d3n augment` crops,
resizes and puts the results back (train/augment/).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from d3n.artifacts import load_torch
from d3n.errors import ArtifactError, ConfigError
from d3n.train.ddpm.model import T_STEPS, build_unet
from d3n.train.generator.train import WEIGHTS


class Generator:
    def __init__(self, unet: torch.nn.Module, config: dict[str, Any]):
        self.unet = unet.eval().requires_grad_(False)
        self.config = config
        self.names: list[str] = list(config["names"])
        self.null = int(config["null"])
        self.size = int(config["size"])
        self.device = next(unet.parameters()).device

    @classmethod
    def load(cls, run: str | Path, device: str | torch.device = "cpu") -> Generator:
        path = Path(run) / WEIGHTS
        if not path.exists():
            raise ArtifactError(f"{path}: no trained defect generator here (run `d3n generator train`)")
        blob = load_torch(path, "defect generator weights")
        unet = build_unet(blob["config"]["unet"])
        unet.load_state_dict(blob["state_dict"])
        return cls(unet.to(device), blob["config"])

    def class_index(self, name: str) -> int:
        if name not in self.names:
            raise ConfigError(f"unknown class '{name}': the generator knows {self.names}")
        if not self.config["crops_per_class"].get(name):
            raise ConfigError(f"class '{name}' had no example in the generator's training data: it cannot draw it")
        return self.names.index(name)

    @torch.no_grad()
    def eps(self, x: torch.Tensor, t, y: torch.Tensor, guidance: float) -> torch.Tensor:
        tt = torch.full((2 * len(x),), int(t), device=self.device)
        e = self.unet(torch.cat([x, x]), tt, class_labels=torch.cat([y, torch.full_like(y, self.null)])).sample
        cond, null = e.chunk(2)
        return null + guidance * (cond - null)

    def _noise(self, shape, gen: torch.Generator) -> torch.Tensor:
        return torch.randn(shape, generator=gen).to(self.device)  # drawn on the CPU: the same on any device

    @torch.no_grad()
    def sdedit(self, x0: torch.Tensor, y: torch.Tensor, strength: float, guidance: float, steps: int,
               gen: torch.Generator) -> torch.Tensor:
        from diffusers import DDIMScheduler

        if not 0 < strength <= 1:
            raise ConfigError(f"strength {strength}: expected 0 < strength <= 1")
        sched = DDIMScheduler(num_train_timesteps=T_STEPS)
        sched.set_timesteps(steps)
        ts = [t for t in sched.timesteps if t <= strength * (T_STEPS - 1)]
        x = sched.add_noise(x0.to(self.device), self._noise(x0.shape, gen), ts[0].repeat(len(x0)))
        for t in ts:
            x = sched.step(self.eps(x, t, y, guidance), t, x).prev_sample
        return x

    @torch.no_grad()
    def inpaint(self, x0: torch.Tensor, keep: torch.Tensor, y: torch.Tensor, guidance: float, steps: int,
                gen: torch.Generator, jump_length: int = 5, jump_n_sample: int = 2) -> torch.Tensor:
        from diffusers import RePaintScheduler

        sched = RePaintScheduler(num_train_timesteps=T_STEPS)
        sched.set_timesteps(steps, jump_length, jump_n_sample)
        x0, keep = x0.to(self.device), keep.to(self.device)
        x = self._noise(x0.shape, gen)
        t_last = sched.timesteps[0] + 1
        for t in sched.timesteps:
            if t < t_last:  # a denoising step; known pixels come from the original noised to t
                x = sched.step(self.eps(x, t, y, guidance), t, x, x0, keep, generator=gen).prev_sample
            else:  # RePaint's jump back: re-noise and denoise again, to harmonise the two regions
                x = sched.undo_step(x, t_last, generator=gen)
            t_last = t
        return x

    @torch.no_grad()
    def blend(self, x0: torch.Tensor, alpha: torch.Tensor, y: torch.Tensor, guidance: float, steps: int,
              gen: torch.Generator) -> torch.Tensor:
        from diffusers import DDIMScheduler

        sched = DDIMScheduler(num_train_timesteps=T_STEPS)
        sched.set_timesteps(steps)
        x0, alpha = x0.to(self.device), alpha.to(self.device)
        x = self._noise(x0.shape, gen)
        ts = list(sched.timesteps)
        for i, t in enumerate(ts):
            x = sched.step(self.eps(x, t, y, guidance), t, x).prev_sample
            if i + 1 < len(ts):  # the original at the next step's noise level outside the defect
                known = sched.add_noise(x0, self._noise(x0.shape, gen), ts[i + 1].repeat(len(x0)))
            else:
                known = x0
            x = alpha * x + (1 - alpha) * known
        return x
