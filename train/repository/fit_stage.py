"""The `resvae` stage: the compressor (ResVAE, or PCA for Table III) fitted on the train split's repository."""

from __future__ import annotations

from pathlib import Path

from d3n.artifacts import METRICS, read_json
from d3n.train.repository.fit import CompressorTrainConfig as Config
from d3n.train.repository.fit import train_compressor

OWN_MANIFEST = True  # train_compressor skips a finished fit itself


def from_pipeline(pcfg, inputs: dict[str, Path]) -> Config:
    c = pcfg.compress  # only the train split's features fit the compressor (no leakage into val)
    return Config(repo=str(inputs["repo"]), method=c.method, latent_channels=c.latent_channels, epochs=c.epochs,
                  steps=c.steps, batch=c.batch, seed=pcfg.seed, device=pcfg.device)


def update(cfg: Config, inputs: dict[str, Path], out: Path, spec, previous: Path):
    """After `d3n data add`: the fitted compressor is kept (it encodes any image's features) unless
    the pipeline's `update.refit_compressor` asks for a new fit."""
    if spec.refit_compressor:
        return None
    return {**read_json(out / METRICS), "reused": True}


def run(cfg: Config, inputs: dict[str, Path], out: Path) -> dict:
    return train_compressor(cfg.model_copy(update={"repo": str(inputs["repo"])}), out)
