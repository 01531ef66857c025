"""`d3n ddpm train`: pre-train the DDPM on the training images (paper §III-B, §IV-A).

Epsilon-prediction MSE at uniformly drawn timesteps, Adam with cosine annealing, optional EMA of
the weights. Every `ckpt_every` steps the complete state is saved (model, optimizer, LR
schedule, EMA, noise RNG, loss history) in the one training-state format (train/checkpoint.py),
with the run's config identity; the data order is a pure function of (seed, epoch), so a killed run
resumed from its checkpoint continues bit-exactly (on the same device), and a resume under other
options is refused with the differing fields named.

With `--device cuda` the model, optimizer and EMA live on the GPU, but the noise and timesteps
are still drawn from a CPU generator (one random stream whatever the device) and checkpoints are
saved from CPU copies, so they load anywhere. The device is not part of the run's identity: a
run started on CPU can be resumed on GPU.

Under torchrun each of N ranks takes every N-th image of each step's batch (and the matching noise
and timesteps, drawn whole as above) and DistributedDataParallel averages the gradients: with
equal shares that is the gradient of the single-process step, so N processes train the same model
as one (up to float summation order), and a checkpoint resumes with any number of them. Rank 0
writes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from tqdm import tqdm

from d3n import distributed
from d3n.artifacts import CONFIG, METRICS, Manifest, is_complete, read_json, save_with, write_json, write_yaml
from d3n.config import StrictModel, identity
from d3n.data.layout import DatasetLayout
from d3n.errors import ConfigError
from d3n.train.checkpoint import EMA, load_state, save_state
from d3n.train.ddpm.model import (
    T_STEPS,
    WEIGHTS,
    build_scheduler,
    build_unet,
    load_images,
    unet_config,
)
from d3n.train.device import Device, resolve_device, to_cpu

CHECKPOINT = "checkpoint.pt"


class DDPMTrainConfig(StrictModel):
    data: str
    preset: Literal["tiny", "paper"] = "tiny"
    size: int = 64  # paper §IV-A: 64x64 DDPM input
    split: str = "train"
    steps: int | None = None  # total optimizer steps; or give epochs
    epochs: int | None = None
    batch: int = 8  # paper uses 2 (GPU memory); 8 suits the tiny preset on CPU
    lr: float = 1e-4  # paper: 5e-6 -> 5e-8 for long GPU runs; a short run needs a larger start
    lr_min: float = 0.0
    ema: float = 0.999  # EMA decay of the weights; 0 disables
    ckpt_every: int = 50
    seed: int = 0
    device: Device = "cpu"  # cpu, cuda, cuda:N or auto; not part of the run's identity


def total_steps(cfg: DDPMTrainConfig, n_images: int) -> int:
    if (cfg.steps is None) == (cfg.epochs is None):
        raise ConfigError("give exactly one of --steps or --epochs")
    return cfg.steps if cfg.steps is not None else cfg.epochs * steps_per_epoch(n_images, cfg.batch)


def steps_per_epoch(n_images: int, batch: int) -> int:
    return max(1, n_images // batch)


def batch_indices(step: int, n_images: int, batch: int, seed: int) -> torch.Tensor:
    """Images of one step: epoch e's order is a permutation seeded by (seed, e)."""
    spe = steps_per_epoch(n_images, batch)
    epoch, pos = divmod(step, spe)
    perm = torch.randperm(n_images, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    return perm[pos * batch:(pos + 1) * batch]


class Trainer:
    """The one DDPM training loop's step: the stage-1 DDPM, and with `labels` (a class per image)
    the class-conditional defect generator, trained for classifier-free guidance: a share
    `p_uncond` of each batch gets the null class (the last class embedding)."""

    def __init__(self, cfg: DDPMTrainConfig, images: torch.Tensor, total: int,
                 device: torch.device | str = "cpu", world: distributed.World | None = None,
                 labels: torch.Tensor | None = None, unet: dict[str, Any] | None = None, p_uncond: float = 0.0):
        torch.manual_seed(cfg.seed)
        self.cfg, self.images, self.total = cfg, images, total
        self.labels, self.p_uncond = labels, p_uncond
        self.device = torch.device(device)
        # initialised on the CPU (same weights for a given seed on any device), then moved
        self.unet_config = unet or unet_config(cfg.preset, cfg.size)
        self.null = self.unet_config.get("num_class_embeds", 0) - 1  # the null class of guidance
        self.unet = build_unet(self.unet_config).to(self.device)
        self.world = world or distributed.world()
        if cfg.batch % self.world.size:
            raise ConfigError(f"batch {cfg.batch} is split among {self.world.size} processes: it must divide evenly")
        if self.world.distributed and len(images) < cfg.batch:  # equal shares keep the averaged gradient exact
            raise ConfigError(f"{len(images)} training images for a batch of {cfg.batch} on {self.world.size} "
                              "processes: every batch must be full; lower the batch")
        self.net = self.unet if not self.world.distributed else torch.nn.parallel.DistributedDataParallel(self.unet)
        self.scheduler = build_scheduler()
        self.opt = torch.optim.Adam(self.unet.parameters(), lr=cfg.lr)
        self.lrs = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=total, eta_min=cfg.lr_min)
        self.ema = EMA(self.unet, cfg.ema) if cfg.ema > 0 else None  # a fixed decay: no warm-up ramp
        self.gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.step = 0
        self.losses: list[float] = []

    def train_step(self) -> float:
        idx = batch_indices(self.step, len(self.images), self.cfg.batch, self.cfg.seed)
        x0 = self.images[idx]
        # drawn on the CPU generator (checkpointed), then moved: the same stream on any device
        noise = torch.randn(x0.shape, generator=self.gen)
        t = torch.randint(0, T_STEPS, (x0.shape[0],), generator=self.gen)
        share = slice(self.world.rank, None, self.world.size)  # this rank's part of the batch
        kw = {}
        if self.labels is not None:  # drawn after noise and t: the unconditional stream stays as it was
            y = self.labels[idx].clone()
            y[torch.rand(len(y), generator=self.gen) < self.p_uncond] = self.null
            kw["class_labels"] = y[share].to(self.device)
        x0, noise, t = x0[share].to(self.device), noise[share].to(self.device), t[share].to(self.device)
        xt = self.scheduler.add_noise(x0, noise, t)
        loss = F.mse_loss(self.net(xt, t, **kw).sample, noise)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.lrs.step()
        if self.ema is not None:
            self.ema.update(self.unet)
        self.step += 1
        if self.world.distributed:  # the batch's loss, as one process would have logged it
            loss = loss.detach().clone()
            torch.distributed.all_reduce(loss)
            loss /= self.world.size
        self.losses.append(float(loss.detach()))
        return self.losses[-1]

    def state(self) -> dict[str, Any]:
        """Everything a resume needs (save_state moves the tensors to the CPU)."""
        return {"step": self.step, "model": self.unet.state_dict(), "opt": self.opt.state_dict(),
                "lrs": self.lrs.state_dict(), "ema": None if self.ema is None else self.ema.state_dict(),
                "gen": self.gen.get_state(), "losses": self.losses}

    def load_state(self, s: dict[str, Any]) -> None:
        self.unet.load_state_dict(s["model"])
        self.opt.load_state_dict(s["opt"])  # moves the moments to the parameters' device
        self.lrs.load_state_dict(s["lrs"])
        if self.ema is not None:  # cfg.ema is part of the identity: present here iff it was saved
            self.ema.load_state_dict(s["ema"])
        self.gen.set_state(s["gen"])
        self.step, self.losses = int(s["step"]), list(s["losses"])

    def save(self, path: Path) -> None:
        save_state(path, self.state(), identity(self.cfg, mode="json"))

    def resume(self, path: Path) -> None:
        """Continue from the state at `path`; refused if it was saved under another config."""
        self.load_state(load_state(path, identity(self.cfg, mode="json"), "DDPM training state"))

    def final_weights(self) -> dict[str, torch.Tensor]:
        return to_cpu(self.ema.ema.state_dict() if self.ema is not None else self.unet.state_dict())


def train_ddpm(cfg: DDPMTrainConfig, out: str | Path, progress: bool = True) -> dict[str, Any]:
    out = Path(out)
    data = DatasetLayout.open(cfg.data)
    if is_complete(out, config=identity(cfg)):
        return read_json(out / METRICS)
    device = resolve_device(cfg.device)
    paths = data.images(cfg.split)
    if not paths:
        raise ConfigError(f"{data.yaml_path}: split '{cfg.split}' has no images")
    main = distributed.world().main  # under torchrun rank 0 writes; every rank trains
    if main:
        out.mkdir(parents=True, exist_ok=True)
        write_yaml(out / CONFIG, cfg.model_dump())
    manifest = Manifest(out, "ddpm", inputs={"data_yaml": data.yaml_path}, config=identity(cfg))
    images = load_images(paths, cfg.size)
    total = total_steps(cfg, len(paths))
    trainer = Trainer(cfg, images, total, device)
    with manifest.timed("train"):
        fit(trainer, out, "ddpm train", progress)
    if not main:
        return {"steps": trainer.step}
    config = {"preset": cfg.preset, "unet": unet_config(cfg.preset, cfg.size), "T": T_STEPS,
              "data_yaml": str(data.yaml_path.resolve()), "split": cfg.split, "ema": cfg.ema > 0}
    save_with(out / WEIGHTS, lambda p: torch.save({"config": config, "state_dict": trainer.final_weights()}, p))
    tail = trainer.losses[-min(len(trainer.losses), 50):]
    metrics = {"steps": trainer.step, "images": len(paths),
               "params": sum(p.numel() for p in trainer.unet.parameters()),
               "loss_first": trainer.losses[0], "loss_last50_mean": sum(tail) / len(tail),
               "device": str(device), "loss_curve": trainer.losses[:: max(1, math.ceil(len(trainer.losses) / 200))]}
    write_json(out / METRICS, metrics)
    manifest.complete(outputs=[WEIGHTS, METRICS, CONFIG])
    return metrics


def fit(trainer: Trainer, out: Path, desc: str, progress: bool = True) -> None:
    """Resume from `out`'s checkpoint if there is one and train to `trainer.total` steps, saving
    the state every `ckpt_every` steps (rank 0)."""
    main = trainer.world.main
    if (out / CHECKPOINT).exists():
        trainer.resume(out / CHECKPOINT)
    with tqdm(total=trainer.total, initial=trainer.step, desc=desc, disable=not (progress and main)) as bar:
        while trainer.step < trainer.total:
            loss = trainer.train_step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            if main and (trainer.step % trainer.cfg.ckpt_every == 0 or trainer.step == trainer.total):
                trainer.save(out / CHECKPOINT)


def finetune_ddpm(cfg: DDPMTrainConfig, out: str | Path, steps: int, progress: bool = True) -> dict[str, Any]:
    """Continue the finished DDPM in `out` for `steps` steps on the split as it is now (after `d3n
    data add`): its weights (EMA ones, if kept) as the start of both model and EMA, a fresh Adam
    and a cosine schedule from `cfg.lr` to `cfg.lr_min` over the steps. ddpm.pt is replaced and
    the manifest rewritten only when the fine-tune finishes (one process: the pipeline runs
    in-place updates on rank 0)."""
    out = Path(out)
    data = DatasetLayout.open(cfg.data)
    paths = data.images(cfg.split)
    blob = torch.load(out / WEIGHTS, map_location="cpu", weights_only=True)
    trainer = Trainer(cfg.model_copy(update={"seed": cfg.seed + 1}), load_images(paths, cfg.size), steps,
                      resolve_device(cfg.device), world=distributed.World())
    trainer.unet.load_state_dict(blob["state_dict"])
    if trainer.ema is not None:
        trainer.ema.ema.load_state_dict(blob["state_dict"])
    for _ in tqdm(range(steps), desc="ddpm fine-tune", disable=not progress):
        trainer.train_step()
    save_with(out / WEIGHTS, lambda p: torch.save({"config": blob["config"], "state_dict": trainer.final_weights()}, p))
    metrics = read_json(out / METRICS)
    metrics["finetuned"] = [*metrics.get("finetuned", []),
                            {"steps": steps, "images": len(paths), "loss_first": trainer.losses[0],
                             "loss_last": trainer.losses[-1]}]
    write_json(out / METRICS, metrics)
    Manifest(out, "ddpm", inputs={"data_yaml": data.yaml_path}, config=identity(cfg)).complete(
        outputs=[WEIGHTS, METRICS, CONFIG])
    return metrics
