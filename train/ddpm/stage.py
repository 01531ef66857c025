"""The `ddpm` stage: the DDPM pre-trained on the train split's images (paper §III-B)."""

from __future__ import annotations

from pathlib import Path

from d3n.train.ddpm.train import DDPMTrainConfig as Config
from d3n.train.ddpm.train import train_ddpm

OWN_MANIFEST = True  # train_ddpm resumes from its checkpoint and skips a finished run itself
DISTRIBUTED = True  # under torchrun every rank trains its share of each batch


def from_pipeline(pcfg, inputs: dict[str, Path]) -> Config:
    s = pcfg.ddpm
    return Config(data=str(inputs["data"]), preset=s.preset, size=s.size, steps=s.steps, epochs=s.epochs,
                  batch=s.batch, lr=s.lr, lr_min=s.lr_min, ema=s.ema, seed=pcfg.seed, device=pcfg.device)


def run(cfg: Config, inputs: dict[str, Path], out: Path) -> dict:
    return train_ddpm(cfg.model_copy(update={"data": str(inputs["data"])}), out)
