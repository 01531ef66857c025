"""The `ddpm` stage: the DDPM pre-trained on the train split's images (paper §III-B)."""

from __future__ import annotations

from pathlib import Path

from d3n.artifacts import METRICS, read_json
from d3n.errors import ConfigError
from d3n.train.ddpm.train import DDPMTrainConfig as Config
from d3n.train.ddpm.train import finetune_ddpm, train_ddpm

OWN_MANIFEST = True  # train_ddpm resumes from its checkpoint and skips a finished run itself
DISTRIBUTED = True  # under torchrun every rank trains its share of each batch


def from_pipeline(pcfg, inputs: dict[str, Path]) -> Config:
    s = pcfg.ddpm
    if (s.steps is None) == (s.epochs is None):
        raise ConfigError("the ddpm stage needs exactly one of ddpm.steps or ddpm.epochs in the pipeline config "
                          f"(got steps={s.steps}, epochs={s.epochs})")
    return Config(data=str(inputs["data"]), preset=s.preset, size=s.size, steps=s.steps, epochs=s.epochs,
                  batch=s.batch, lr=s.lr, lr_min=s.lr_min, ema=s.ema, seed=pcfg.seed, device=pcfg.device)


def update(cfg: Config, inputs: dict[str, Path], out: Path, spec, previous: Path) -> dict:
    """After `d3n data add`: the DDPM reused as it is, or fine-tuned `update.ddpm_steps` steps on
    the grown train split (from its EMA weights, at the config's final learning rate)."""
    if spec.ddpm_steps == 0:
        return {**read_json(out / METRICS), "reused": True}
    return finetune_ddpm(cfg.model_copy(update={"data": str(inputs["data"])}), out, spec.ddpm_steps)


def run(cfg: Config, inputs: dict[str, Path], out: Path) -> dict:
    return train_ddpm(cfg.model_copy(update={"data": str(inputs["data"])}), out)
