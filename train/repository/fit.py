"""`d3n resvae train`: fit one compressor per level on a raw train-split repository (paper §III-B).

`--method resvae` trains a ResVAE per level (KL weight 1 + MSE, Adam, batch 64: paper §IV-A);
`--method pca` fits PCA to the same latent size (the Table III ablation). Items are single
(image, timestep) maps read at random from the memory-mapped repository. A fixed fraction of the
repository's images is held out of the fit and used to report reconstruction fidelity.

With `--device cuda` the ResVAE trains on the GPU (PCA moments stay in float64 NumPy on the CPU);
it is initialised on the CPU and saved from CPU tensors, and the device is not part of the run's
identity.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm import tqdm

from d3n.artifacts import CONFIG, METRICS, Manifest, is_complete, read_json, write_json, write_yaml
from d3n.config import StrictModel, identity
from d3n.errors import ArtifactError, ConfigError
from d3n.train.device import Device, resolve_device, to_cpu
from d3n.train.repository.compress import COMPRESSOR, reconstruction_metrics, save_compressor
from d3n.train.repository.pca import PCADecoder, PCAEncoder, fit_pca
from d3n.train.repository.resvae import ResVAE, ResVAEDecoder, ResVAEEncoder
from d3n.train.repository.store import INDEX, FeatureStore


class CompressorTrainConfig(StrictModel):
    repo: str
    method: Literal["resvae", "pca"] = "resvae"
    latent_channels: int | None = None  # of the widest level; default width / 8 (paper: 512 -> 64)
    epochs: int = 10  # paper: 2000 (GPU); steps, if given, wins
    steps: int | None = None  # optimizer steps per level
    batch: int = 64  # paper §IV-A
    lr: float = 1e-3
    kl_weight: float = 1.0  # paper §IV-A: KL penalty scale 1
    hidden: int | None = None
    blocks: int = 2
    pca_init: bool = True  # start the ResVAE's linear paths at PCA
    holdout: float = 0.1  # fraction of images kept out of the fit, for fidelity metrics
    seed: int = 0
    device: Device = "cpu"  # cpu, cuda, cuda:N or auto; not part of the run's identity


def latent_sizes(store: FeatureStore, latent: int | None) -> dict[str, int]:
    """Latent channels per level, proportional to each level's width (ratio 1/8 by default)."""
    widths = {lv: store.shape(lv)[1] for lv in store.levels}
    widest = max(widths.values())
    latent = latent or max(1, widest // 8)
    if not 1 <= latent <= widest:
        raise ConfigError(f"--latent-channels must be in [1, {widest}], got {latent}")
    return {lv: max(1, round(latent * w / widest)) for lv, w in widths.items()}


def split_images(n: int, holdout: float, seed: int) -> tuple[list[int], list[int]]:
    """(fit, held-out) image indices; at least one image on each side when n >= 2."""
    perm = np.random.default_rng(seed).permutation(n)
    k = min(max(1, int(round(n * holdout))), n - 1) if holdout > 0 and n >= 2 else 0
    return sorted(perm[k:].tolist()), sorted(perm[:k].tolist())


def _image_maps(store: FeatureStore, level: str, images: list[int], chunk: int = 16):
    for i in range(0, len(images), chunk):
        yield np.stack([store.get_index(j)[level] for j in images[i:i + chunk]])


def _fit_pca(store: FeatureStore, level: str, images: list[int], latent: int) -> dict[str, np.ndarray]:
    return fit_pca(_image_maps(store, level, images), store.shape(level)[1], latent)


def _batch(store: FeatureStore, level: str, items: np.ndarray) -> torch.Tensor:
    maps = [store.get_index(int(i))[level][int(t)] for i, t in items]
    return torch.from_numpy(np.stack(maps).astype(np.float32))


def _train_resvae(store: FeatureStore, level: str, fit_ids: list[int], latent: int,
                  cfg: CompressorTrainConfig, pca: dict[str, np.ndarray], progress: bool,
                  device: torch.device) -> tuple[ResVAE, list[float]]:
    torch.manual_seed(cfg.seed)
    ch = store.shape(level)[1]
    vae = ResVAE(ch, latent, hidden=cfg.hidden, blocks=cfg.blocks)  # CPU init: same weights on any device
    vae.set_normalisation(torch.from_numpy(pca["mean"]), math.sqrt(max(float(pca["total"]), 1e-12) / ch))
    if cfg.pca_init:
        vae.init_linear(torch.from_numpy(pca["components"]))
    vae.to(device)
    items = np.array([(i, t) for i in fit_ids for t in range(len(store.timesteps))])
    per_epoch = max(1, len(items) // cfg.batch)
    steps = cfg.steps if cfg.steps is not None else cfg.epochs * per_epoch
    opt = torch.optim.Adam(vae.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=cfg.lr * 0.01)
    rng = np.random.default_rng(cfg.seed)
    order, losses = rng.permutation(len(items)), []
    vae.train()
    for step in tqdm(range(steps), desc=f"resvae {level}", disable=not progress):
        pos = step % per_epoch
        if pos == 0 and step:
            order = rng.permutation(len(items))
        x = _batch(store, level, items[order[pos * cfg.batch:(pos + 1) * cfg.batch]]).to(device)
        loss, parts = vae.loss(x, cfg.kl_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(parts["mse"])
    return vae.eval(), losses


def _pca_codec(p: dict[str, np.ndarray], device: torch.device | str = "cpu"):
    mean, comps = torch.from_numpy(p["mean"]), torch.from_numpy(p["components"])
    return PCAEncoder(mean, comps).to(device).eval(), PCADecoder(mean, comps).to(device).eval()


def train_compressor(cfg: CompressorTrainConfig, out: str | Path, progress: bool = True) -> dict[str, Any]:
    out = Path(out)
    if is_complete(out, config=identity(cfg)):
        return read_json(out / METRICS)
    device = resolve_device(cfg.device)
    store = FeatureStore.open(cfg.repo)
    if store.kind != "raw":
        raise ArtifactError(f"{cfg.repo}: is a '{store.kind}' repository; fit on a raw one")
    if store.meta.get("split") not in (None, "train"):
        raise ConfigError(f"{cfg.repo}: built from split '{store.meta.get('split')}'; a compressor is fitted "
                          "on the train split only (no leakage into evaluation)")
    out.mkdir(parents=True, exist_ok=True)
    write_yaml(out / CONFIG, cfg.model_dump())
    manifest = Manifest(out, f"compressor-{cfg.method}", inputs={"repo": Path(cfg.repo) / INDEX},
                        config=identity(cfg))
    fit_ids, held = split_images(len(store), cfg.holdout, cfg.seed)
    held_ids = [store.image_ids[i] for i in held]
    sizes = latent_sizes(store, cfg.latent_channels)
    levels, metrics = {}, {"method": cfg.method, "fit_images": len(fit_ids), "held_out_images": held_ids,
                           "latent_channels": sizes, "device": str(device), "levels": {}}
    for lv in store.levels:
        with manifest.timed(f"fit_{lv}"):
            pca = _fit_pca(store, lv, fit_ids, sizes[lv])
            pca_fid = reconstruction_metrics(store, {lv: _pca_codec(pca, device)}, held_ids, levels=[lv])[lv] if held_ids else None
            m: dict[str, Any] = {"in_channels": store.shape(lv)[1], "latent_channels": sizes[lv],
                                 "pca_explained": float(pca["explained"].sum() / max(float(pca["total"]), 1e-12))}
            if cfg.method == "pca":
                levels[lv] = {"hparams": {}, "state": {"mean": torch.from_numpy(pca["mean"]),
                                                       "components": torch.from_numpy(pca["components"])}}
                m["held_out"] = pca_fid
            else:
                vae, losses = _train_resvae(store, lv, fit_ids, sizes[lv], cfg, pca, progress, device)
                levels[lv] = {"hparams": vae.hparams, "state": to_cpu(vae.state_dict())}
                codec = {lv: (ResVAEEncoder(vae), ResVAEDecoder(vae))}
                m["held_out"] = reconstruction_metrics(store, codec, held_ids, levels=[lv])[lv] if held_ids else None
                m["held_out_pca"] = pca_fid
                m["mse_first"], m["mse_last"] = losses[0], float(np.mean(losses[-max(1, len(losses) // 10):]))
                m["mse_curve"] = losses[:: max(1, math.ceil(len(losses) / 200))]
            metrics["levels"][lv] = m
    save_compressor(out, cfg.method, levels, str(Path(cfg.repo).resolve()))
    write_json(out / METRICS, metrics)
    manifest.complete(outputs=[COMPRESSOR, METRICS, CONFIG])
    return metrics
