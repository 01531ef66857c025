"""The `generator` stage: the defect generator, trained when the pipeline's `augment:` section
draws with it (sdedit, inpaint, blend)."""

from __future__ import annotations

from pathlib import Path

from d3n.train.augment.params import GENERATIVE
from d3n.train.generator.train import GeneratorConfig as Config
from d3n.train.generator.train import train_generator

OWN_MANIFEST = True  # train_generator resumes from its checkpoint and skips a finished run itself
DISTRIBUTED = True  # the DDPM loop: under torchrun every rank trains its share of each batch


def enabled(pcfg) -> bool:
    return pcfg.augment is not None and pcfg.augment.method in GENERATIVE


def from_pipeline(pcfg, inputs: dict[str, Path]) -> Config:
    g = pcfg.augment.generator
    return Config(data=str(inputs["data"]), seed=pcfg.seed, device=pcfg.device, **g.model_dump())


def run(cfg: Config, inputs: dict[str, Path], out: Path) -> dict:
    return train_generator(cfg.model_copy(update={"data": str(inputs["data"])}), out)
