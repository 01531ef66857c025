"""The DDPM of stage 1 (paper §III-B, Fig. 3): diffusers UNet2DModel presets, the noise schedule,
image loading, and loading a trained DDPM run.

Images are resized straight to the DDPM size (no letterbox, as the paper does) and scaled to
[-1, 1], the range `DDPMScheduler.add_noise` expects.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from d3n.artifacts import load_torch
from d3n.errors import ArtifactError, ConfigError, DataError

T_STEPS = 1000  # DDPM diffusion steps T (paper §III-B)
WEIGHTS = "ddpm.pt"

# `tiny`: ~4.6 M parameters, trainable on CPU. `paper`: decoder levels up to 512 channels (GPU).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"block_out_channels": (32, 64, 128, 128), "layers_per_block": 1, "norm_num_groups": 8},
    "paper": {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "norm_num_groups": 32},
}


def unet_config(preset: str, size: int) -> dict[str, Any]:
    if preset not in PRESETS:
        raise ConfigError(f"unknown DDPM preset '{preset}' (choose from {sorted(PRESETS)})")
    if size % 8:
        raise ConfigError(f"DDPM size {size} must be a multiple of 8 (three downsamplings)")
    cfg = dict(PRESETS[preset])
    cfg["block_out_channels"] = list(cfg["block_out_channels"])
    return {"sample_size": size, "in_channels": 3, "out_channels": 3, **cfg}


def build_unet(config: dict[str, Any]) -> torch.nn.Module:
    from diffusers import UNet2DModel

    return UNet2DModel(**config)


def build_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=T_STEPS)


def load_image(path: Path, size: int) -> np.ndarray:
    """(3, size, size) float32 RGB in [-1, 1]."""
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise DataError(f"{path}: cannot read image")
    img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
    img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB).astype(np.float32) / 127.5 - 1.0
    return img.transpose(2, 0, 1)


def load_images(paths: list[Path], size: int) -> torch.Tensor:
    return torch.from_numpy(np.stack([load_image(p, size) for p in paths]))


class DDPM:
    """A trained DDPM run: the UNet (EMA weights when trained with EMA) and its schedule."""

    def __init__(self, unet: torch.nn.Module, config: dict[str, Any], run_dir: Path):
        self.unet = unet.eval().requires_grad_(False)
        self.scheduler = build_scheduler()
        self.config = config
        self.run_dir = run_dir
        self.size = int(config["unet"]["sample_size"])

    @classmethod
    def load(cls, run_dir: str | Path, device: str | torch.device = "cpu") -> DDPM:
        run_dir = Path(run_dir)
        path = run_dir / WEIGHTS
        if not path.exists():
            raise ArtifactError(f"{path}: no trained DDPM here (run `d3n ddpm train` to finish it)")
        blob = load_torch(path, "DDPM weights file")
        unet = build_unet(blob["config"]["unet"])
        unet.load_state_dict(blob["state_dict"])
        return cls(unet.to(device), blob["config"], run_dir)
