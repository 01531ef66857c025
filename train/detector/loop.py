"""One plain training loop for every detector d3n trains: baseline, fusion teacher, student.

What differs between them lives in a `Task` (how to compute the loss, how to predict, how to
save); the schedule, augmentation, optimiser, EMA and evaluation are shared, so a baseline and a
student trained with the same config and seed differ only by the teacher's terms. The recipe
follows ultralytics' detection defaults (SGD/AdamW "auto", linear LR decay, warmup, EMA, mosaic
closed for the last epochs, nominal batch 64).

Under torchrun (d3n.distributed) the same loop runs on every rank: `batch` stays the effective
batch of one optimiser step and is split evenly across the ranks (a DistributedSampler over the
same seeded permutation, so the ranks' batches together are the single-process batch), gradients
are averaged by DistributedDataParallel, and the loss is scaled by the world size as ultralytics
does (its loss grows with the batch; the average would otherwise shrink the step). Rank 0
evaluates and writes; a state saved with N processes resumes with M.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import random
import time
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from d3n import distributed
from d3n.config import StrictModel, identity, placement
from d3n.data.layout import DatasetLayout
from d3n.train.checkpoint import EMA, load_state, rng_state, save_state, set_rng_state
from d3n.train.detector.data import AugmentConfig, DetectionDataset, collate, seed_worker
from d3n.train.detector.evaluate import evaluate, fitness
from d3n.train.device import Device, resolve_device

log = logging.getLogger(__name__)

STATE = "last_state.pt"
EMA_DECAY, EMA_TAU = 0.9999, 2000  # ultralytics' ModelEMA defaults


class TrainConfig(StrictModel):
    """Schedule and augmentation. Defaults: ultralytics' detection defaults (paper: 100 epochs)."""

    imgsz: int = 640
    epochs: int = 100
    batch: int = 16
    device: Device = "cpu"  # cpu, cuda, cuda:N or auto
    seed: int = 0
    workers: int = placement(2)  # data-loader processes: where the run happens, not what it makes
    optimizer: Literal["auto", "SGD", "AdamW"] = "auto"  # auto: ultralytics' rule, which ignores lr0
    weights: Path | None = None  # initial weights of every detector (a local .pt; nothing is downloaded)
    lr0: float = 0.01
    lrf: float = 0.01
    momentum: float = 0.937
    weight_decay: float = 5e-4
    warmup_epochs: float = 3.0
    warmup_bias_lr: float = 0.1
    warmup_momentum: float = 0.8
    nbs: int = 64  # nominal batch size: gradients accumulate up to it
    close_mosaic: int = 10
    val_every: int = 1
    mosaic: float = 1.0
    scale: float = 0.5
    translate: float = 0.1
    fliplr: float = 0.5
    hsv_h: float = 0.015
    hsv_s: float = 0.7
    hsv_v: float = 0.4

    def augment(self) -> AugmentConfig:
        return AugmentConfig(mosaic=self.mosaic, scale=self.scale, translate=self.translate, fliplr=self.fliplr,
                             hsv_h=self.hsv_h, hsv_s=self.hsv_s, hsv_v=self.hsv_v)


class Task(Protocol):
    """What a particular detector adds to the loop.

    A task may also define `identity() -> dict` (plain data: what else defines its run, e.g. its
    stage config); it is saved with the training state, and a resume under another one is refused;
    and `unused_parameters = True` when some of its model's parameters may get no gradient (under
    DDP the wrapper then looks for them every step).
    """

    model: torch.nn.Module  # the module being trained

    def loss(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]: ...

    def predict(self, model: torch.nn.Module, batch: dict) -> torch.Tensor: ...

    def save(self, model: torch.nn.Module, path: Path, metrics: dict) -> None: ...


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def to_device(batch: dict, device: torch.device) -> dict:
    out = dict(batch)
    out["img"] = batch["img"].to(device, non_blocking=True).float() / 255
    for k in ("batch_idx", "cls", "bboxes"):
        out[k] = batch[k].to(device)
    return out


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, nc: int, iterations: int):
    """Three groups as ultralytics: weights with decay, norm weights and biases without. Returns the
    optimiser and what it is (name, lr0, momentum, and what `auto` resolved to), for the log and
    metrics.json: `auto` overrides lr0, so a run must say what it really trained with."""
    name, lr, momentum = cfg.optimizer, cfg.lr0, cfg.momentum
    if name == "auto":  # ultralytics' rule: AdamW with a fitted lr for short runs, SGD for long ones
        name, lr, momentum = ("SGD", 0.01, 0.9) if iterations > 10000 else ("AdamW", round(0.002 * 5 / (4 + nc), 6), 0.9)
    info = {"name": name, "lr0": lr, "momentum": momentum, "weight_decay": cfg.weight_decay,
            "from": f"auto ({iterations} iterations, {nc} classes)" if cfg.optimizer == "auto" else "config"}
    decay, no_decay, bias = [], [], []
    for module in model.modules():
        for pname, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            if pname == "bias":
                bias.append(p)
            elif isinstance(module, (torch.nn.BatchNorm2d, torch.nn.LayerNorm, torch.nn.GroupNorm)):
                no_decay.append(p)
            else:
                decay.append(p)
    if name == "AdamW":
        opt = torch.optim.AdamW(bias, lr=lr, betas=(momentum, 0.999), weight_decay=0.0)
    else:
        opt = torch.optim.SGD(bias, lr=lr, momentum=momentum, nesterov=True)
    opt.add_param_group({"params": decay, "weight_decay": cfg.weight_decay})
    opt.add_param_group({"params": no_decay, "weight_decay": 0.0})
    return opt, info


def per_rank_batch(cfg: TrainConfig, world: distributed.World) -> int:
    if cfg.batch % world.size:
        from d3n.errors import ConfigError

        raise ConfigError(f"train.batch {cfg.batch} is the effective batch of all {world.size} processes "
                          "together: it must divide evenly among them")
    return cfg.batch // world.size


def make_loaders(cfg: TrainConfig, data: Path, world: distributed.World = distributed.World()):
    """Train and val loaders, and a test loader when the dataset has a held-out test split (its
    numbers are recorded for the checkpoint val chose, never used to choose). Under torchrun the
    train loader gives this rank its share of each batch."""
    train_ds = DetectionDataset(data, "train", cfg.imgsz, cfg.augment(), seed=cfg.seed)
    # workers are not persistent: each epoch's iterator hands them the dataset as it is then (its
    # epoch, which seeds the augmentation, and mosaic closed for the last epochs); persistent
    # workers keep the copy of the first epoch, so every epoch would repeat its augmentations
    kw = {"num_workers": cfg.workers, "collate_fn": collate, "worker_init_fn": seed_worker,
          "persistent_workers": False}
    if world.distributed:  # the permutation RandomSampler draws below, dealt out rank by rank
        sampler = DistributedSampler(train_ds, world.size, world.rank, shuffle=True, seed=cfg.seed)
        train = DataLoader(train_ds, batch_size=per_rank_batch(cfg, world), sampler=sampler, **kw)
    else:
        g = torch.Generator().manual_seed(cfg.seed)
        train = DataLoader(train_ds, batch_size=cfg.batch, shuffle=True, generator=g, drop_last=False, **kw)
    val = DataLoader(DetectionDataset(data, "val", cfg.imgsz), batch_size=cfg.batch, shuffle=False, **kw)
    layout = DatasetLayout.open(data)
    test = None
    if layout.has("test") and layout.images("test"):
        test = DataLoader(DetectionDataset(data, "test", cfg.imgsz), batch_size=cfg.batch, shuffle=False, **kw)
    return train, val, test


def train(task: Task, cfg: TrainConfig, data: Path, out: Path, names: list[str],
          on_epoch=None) -> dict:
    """Train `task.model`; writes best.pt (via task.save), last_state.pt, results.csv. Returns the
    best validation metrics (plus a `history` list)."""
    from d3n.offline import configure_ultralytics

    configure_ultralytics()
    world = distributed.world()
    if world.main:
        out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    model = task.model.to(device)
    train_loader, val_loader, test_loader = make_loaders(cfg, data, world)
    nb = len(train_loader)
    accumulate = max(round(cfg.nbs / cfg.batch), 1)
    cfg_wd = cfg.weight_decay * cfg.batch * accumulate / cfg.nbs
    opt, opt_info = build_optimizer(model, cfg.model_copy(update={"weight_decay": cfg_wd}), len(names),
                                    math.ceil(len(train_loader.dataset) / max(cfg.batch, cfg.nbs)) * cfg.epochs)
    log.info("optimizer %s lr0 %g momentum %g (%s)", opt_info["name"], opt_info["lr0"], opt_info["momentum"],
             opt_info["from"])
    if world.distributed:
        opt_info["processes"] = world.size
        opt_info["batch_per_process"] = per_rank_batch(cfg, world)
        log.info("%d processes x batch %d = effective batch %d; %d optimiser steps per epoch at most, "
                 "gradients accumulated to the nominal batch %d", world.size, opt_info["batch_per_process"],
                 cfg.batch, nb, cfg.nbs)
    lr0 = opt_info["lr0"]
    lf = lambda e: (1 - e / cfg.epochs) * (1.0 - cfg.lrf) + cfg.lrf  # noqa: E731  linear decay
    for g in opt.param_groups:
        g["initial_lr"] = lr0
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=lf)
    ema = EMA(model, EMA_DECAY, EMA_TAU)
    nw = max(round(cfg.warmup_epochs * nb), 100) if cfg.warmup_epochs > 0 else -1
    run_identity = state_identity(task, cfg)
    start, best, history = _resume(out / STATE, run_identity, model, ema, opt, sched)
    # the module that trains: the model itself, or its DDP wrapper (forward syncs the gradients)
    net = model if not world.distributed else torch.nn.parallel.DistributedDataParallel(
        model, find_unused_parameters=getattr(task, "unused_parameters", False))

    for epoch in range(start, cfg.epochs):
        ds = train_loader.dataset
        if epoch >= cfg.epochs - cfg.close_mosaic and ds.aug.mosaic:
            ds.aug.mosaic = 0.0
            log.info("closing mosaic for the last %d epochs", cfg.close_mosaic)
        ds.set_epoch(epoch)
        if world.distributed:  # shuffle order depends on the epoch only
            train_loader.sampler.set_epoch(epoch)
        else:
            train_loader.generator.manual_seed(cfg.seed + epoch)
        model.train()
        t0, losses, last_step, steps = time.time(), [], -1, 0
        opt.zero_grad()
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, disable=not world.main)
        for i, batch in enumerate(bar):
            ni = i + nb * epoch
            if ni <= nw:  # warmup: lr ramps up (bias from warmup_bias_lr), accumulation grows to nbs
                accumulate = max(1, round(np.interp(ni, [0, nw], [1, cfg.nbs / cfg.batch])))
                for j, g in enumerate(opt.param_groups):
                    start_lr = cfg.warmup_bias_lr if j == 0 else 0.0
                    g["lr"] = np.interp(ni, [0, nw], [start_lr, g["initial_lr"] * lf(epoch)])
                    if "momentum" in g:
                        g["momentum"] = np.interp(ni, [0, nw], [cfg.warmup_momentum, cfg.momentum])
            step = ni - last_step >= accumulate or i == nb - 1
            # between optimiser steps the ranks need not exchange gradients (they accumulate locally)
            with net.no_sync() if world.distributed and not step else contextlib.nullcontext():
                loss, items = task.loss(net, to_device(batch, device))
                (loss * world.size).backward()
            if step:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=10.0)
                opt.step()
                opt.zero_grad()
                ema.update(model)
                last_step, steps = ni, steps + 1
            losses.append(items)
            bar.set_postfix({k: f"{v:.3f}" for k, v in items.items()})
        sched.step()
        row = {"epoch": epoch + 1, "seconds": round(time.time() - t0, 2), "lr": opt.param_groups[0]["lr"],
               "steps": steps}
        row.update({k: float(np.mean([x[k] for x in losses])) for k in losses[0]})
        if on_epoch is not None:
            row.update(on_epoch(model, epoch) or {})
        if not world.main:  # rank 0 evaluates and writes; the others wait for it (however long that takes)
            history.append(row)
            distributed.barrier(long=True)
            continue
        if (epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs:
            metrics = evaluate(lambda b: task.predict(ema.ema, to_device(b, device)), val_loader, names)
            row.update({k: metrics[k] for k in ("mAP50", "mAP50-95", "precision", "recall")})
            if best is None or fitness(metrics) >= fitness(best):
                best = {**metrics, "epoch": epoch + 1}
                if test_loader is not None:  # reported, never used to choose
                    best["test"] = evaluate(lambda b: task.predict(ema.ema, to_device(b, device)), test_loader,
                                            names, desc="test")
                task.save(ema.ema, out / "best.pt", best)
        history.append(row)
        _write_results(out / "results.csv", history)
        _save_state(out / STATE, run_identity, epoch, model, ema, opt, sched, best, history)
        log.info("epoch %d/%d %s", epoch + 1, cfg.epochs, {k: round(v, 4) if isinstance(v, float) else v
                                                           for k, v in row.items()})
        distributed.barrier(long=True)
    if world.main:
        task.save(ema.ema, out / "last.pt", best or {})
    return {**(best or {}), "history": history, "optimizer": opt_info}


def finetune(tcfg: TrainConfig, previous: Path, spec) -> TrainConfig | None:
    """The schedule of a detector brought up to date after `d3n data add`: start from the previous
    run's best.pt (kept as `previous`) for `spec.epochs` (default a quarter of the schedule); None
    when the pipeline's `update.detectors` says retrain."""
    if spec.detectors != "finetune":
        return None
    return tcfg.model_copy(update={"weights": Path(previous),
                                   "epochs": spec.epochs or max(1, tcfg.epochs // 4)})


# Bumped when a fix changes what the same config trains, so runs made before it retrain instead of
# passing as up to date. 2: loader workers no longer persistent (before, with workers > 0, every
# epoch repeated the first epoch's augmentations and mosaic never closed).
LOADER_VERSION = 2


def weights_key(tcfg: TrainConfig) -> dict:
    """What a detector stage's key holds besides its config (`external`): the initial weights'
    content (a new file under the same name retrains; a missing one is an error naming it) and the
    training data pipeline's version."""
    from d3n.artifacts import sha256_file
    from d3n.errors import ArtifactError

    key = {"loader": LOADER_VERSION}
    if tcfg.weights is None:
        return key
    if not Path(tcfg.weights).is_file():
        raise ArtifactError(f"{tcfg.weights}: initial weights not found (a local file; nothing is downloaded)")
    return {**key, "weights": sha256_file(tcfg.weights)}


SCORES = ("mAP50", "mAP50-95", "precision", "recall", "recall@0.25", "per_class_AP50", "miss_rate",
          "overkill_rate", "defect_images", "clean_images")


def summary(best: dict) -> dict:
    """metrics.json's common part from `train()`'s result: the val scores that chose the checkpoint
    (top level and under `val`), the held-out `test` scores when the dataset has a test split, and
    `report_split`, the split a report should quote (test when it exists: val chose the checkpoint)."""
    history = best.get("history", [])
    val = {k: best.get(k) for k in SCORES}
    out = {**val, "best_epoch": best.get("epoch"), "selected_on": "val", "val": val,
           "report_split": "test" if best.get("test") else "val", "optimizer": best.get("optimizer"),
           "train_seconds": round(sum(r["seconds"] for r in history), 1)}
    if best.get("test"):
        out["test"] = {k: best["test"].get(k) for k in SCORES}
    return out


def headline(metrics: dict) -> str:
    """One line for a command's output, saying which split the numbers are from."""
    split = metrics.get("report_split", "val")
    m = metrics.get(split) or metrics
    note = "test, checkpoint chosen on val" if split == "test" else "val, which also chose the checkpoint"
    return f"mAP50 {m['mAP50']:.3f}  mAP50-95 {m['mAP50-95']:.3f} ({note})"


def _write_results(path: Path, history: list[dict]) -> None:
    from d3n.artifacts import atomic_path

    keys = list(dict.fromkeys(k for row in history for k in row))
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(history)


def state_identity(task: Task, cfg: TrainConfig) -> dict[str, Any]:
    """What a resumed run must share with the one that saved the state: the TrainConfig (less
    device and workers), the task's kind and, if it has one, the task's own identity."""
    ident: dict[str, Any] = {"train": identity(cfg, mode="json"), "task": type(task).__name__}
    if callable(getattr(task, "identity", None)):
        ident["task_identity"] = task.identity()
    return ident


def _save_state(path: Path, run_identity: dict, epoch: int, model, ema: EMA, opt, sched, best, history) -> None:
    state = {"epoch": epoch, "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
             "scheduler": sched.state_dict(), "best": best, "history": history, "rng": rng_state()}
    save_state(path, state, run_identity)


def _resume(path: Path, run_identity: dict, model, ema: EMA, opt, sched):
    """Resume a killed run from its last state (model, optimizer, scheduler, EMA and RNG exactly as
    saved); a state saved under another config is refused, not silently continued."""
    if not path.exists():
        return 0, None, []
    state = load_state(path, run_identity)
    model.load_state_dict(state["model"])
    ema.load_state_dict(state["ema"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    log.info("resuming from %s after epoch %d", path, state["epoch"] + 1)
    return state["epoch"] + 1, state["best"], state["history"]
