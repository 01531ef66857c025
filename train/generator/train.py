"""`d3n generator train`: the class-conditional defect generator (a diffusers UNet2DModel with one
class embedding per defect class plus a null class), trained on defect crops with the stage-1
DDPM's loop (train/ddpm/train.py: epsilon MSE, Adam with cosine decay, EMA, resumable state);
a share `p_uncond` of each batch is trained unconditioned, for classifier-free guidance."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from d3n import distributed
from d3n.artifacts import CONFIG, METRICS, Manifest, is_complete, read_json, save_with, write_json, write_yaml
from d3n.config import identity
from d3n.data.layout import DatasetLayout
from d3n.errors import DataError
from d3n.train.ddpm.model import T_STEPS, unet_config
from d3n.train.ddpm.train import DDPMTrainConfig, Trainer, fit, total_steps
from d3n.train.device import resolve_device
from d3n.train.generator.crops import defect_crops, load_crops

WEIGHTS = "generator.pt"


class GeneratorConfig(DDPMTrainConfig):
    size: int = 64  # crop resolution
    context: float = 1.5  # crop side / the box's longer side
    min_side: int = 32  # smallest crop, in image pixels (a 5-pixel pit still gets some surroundings)
    p_uncond: float = 0.1  # share of each batch trained with the null class (classifier-free guidance)


def train_generator(cfg: GeneratorConfig, out: str | Path, progress: bool = True) -> dict[str, Any]:
    out = Path(out)
    data = DatasetLayout.open(cfg.data)
    if is_complete(out, config=identity(cfg)):
        return read_json(out / METRICS)
    crops = defect_crops(data, cfg.split, cfg.context, cfg.min_side)
    if not crops:
        raise DataError(f"{data.yaml_path}: split '{cfg.split}' has no boxes: no defect to learn from")
    per_class = {n: sum(c.cls == k for c in crops) for k, n in enumerate(data.names)}
    main = distributed.world().main
    if main:
        out.mkdir(parents=True, exist_ok=True)
        write_yaml(out / CONFIG, cfg.model_dump())
    manifest = Manifest(out, "generator", inputs={"data_yaml": data.yaml_path}, config=identity(cfg))
    unet = {**unet_config(cfg.preset, cfg.size), "num_class_embeds": data.nc + 1}  # the last one is null
    trainer = Trainer(cfg, torch.from_numpy(load_crops(crops, cfg.size)), total_steps(cfg, len(crops)),
                      resolve_device(cfg.device), labels=torch.tensor([c.cls for c in crops]), unet=unet,
                      p_uncond=cfg.p_uncond)
    with manifest.timed("train"):
        fit(trainer, out, "generator train", progress)
    if not main:
        return {"steps": trainer.step}
    config = {"unet": unet, "T": T_STEPS, "names": list(data.names), "null": data.nc, "size": cfg.size,
              "context": cfg.context, "min_side": cfg.min_side, "crops_per_class": per_class,
              "data_yaml": str(data.yaml_path.resolve()), "split": cfg.split}
    save_with(out / WEIGHTS, lambda p: torch.save({"config": config, "state_dict": trainer.final_weights()}, p))
    tail = trainer.losses[-min(len(trainer.losses), 50):]
    metrics = {"steps": trainer.step, "crops": len(crops), "crops_per_class": per_class,
               "unseen_classes": [n for n, k in per_class.items() if not k],
               "loss_first": trainer.losses[0], "loss_last50_mean": sum(tail) / len(tail),
               "loss_curve": trainer.losses[:: max(1, math.ceil(len(trainer.losses) / 200))]}
    write_json(out / METRICS, metrics)
    manifest.complete(outputs=[WEIGHTS, METRICS, CONFIG])
    return metrics
