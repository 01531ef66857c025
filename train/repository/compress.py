"""Compressor runs (ResVAE or PCA) and the compressed repository.

A compressor run folder holds `compressor.pt`: the method and, per level, the hyper-parameters
and weights. `load_decoder(run)` gives the frozen per-level "feature mapping" of paper Fig. 5
(latents -> DDPM features) that the teacher applies to each loaded batch; `load_encoder(run)`
the matching features -> latents map used to write a compressed repository.

Compressors are saved from CPU tensors and loaded with map_location="cpu", then moved to the
requested device; `--device` of `d3n repo compress` is not part of the output's identity.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from d3n.artifacts import (
    CONFIG,
    METRICS,
    Manifest,
    is_complete,
    load_torch,
    read_json,
    save_with,
    write_json,
    write_yaml,
)
from d3n.config import StrictModel, validate
from d3n.errors import ArtifactError
from d3n.train.device import Device, resolve_device
from d3n.train.repository.pca import PCADecoder, PCAEncoder
from d3n.train.repository.resvae import ResVAE, ResVAEDecoder, ResVAEEncoder
from d3n.train.repository.store import INDEX, FeatureStore, StoreWriter

COMPRESSOR = "compressor.pt"
METHODS = ("resvae", "pca")


class RepoCompressConfig(StrictModel):
    """`d3n repo compress` options."""

    repo: str  # raw repository (any split)
    compressor: str  # compressor run folder (`--resvae`)
    method: Literal["resvae", "pca"] | None = None  # assert the compressor's method
    batch: int = 32
    device: Device = "cpu"  # cpu, cuda, cuda:N or auto; not part of the output's identity


def save_compressor(run_dir: str | os.PathLike, method: str, levels: dict[str, dict[str, Any]],
                    source_repo: str) -> Path:
    blob = {"method": method, "source_repo": source_repo, "levels": levels}
    return save_with(Path(run_dir) / COMPRESSOR, lambda p: torch.save(blob, p))


def read_compressor(run_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(run_dir) / COMPRESSOR
    if not path.exists():
        raise ArtifactError(f"{path}: no compressor here (run `d3n resvae train` first)")
    blob = load_torch(path, "compressor file")
    if blob.get("method") not in METHODS:
        raise ArtifactError(f"{path}: unknown compressor method {blob.get('method')!r}")
    return blob


def _build(method: str, entry: dict[str, Any]) -> tuple[nn.Module, nn.Module]:
    if method == "pca":
        mean, comps = entry["state"]["mean"].float(), entry["state"]["components"].float()
        return PCAEncoder(mean, comps), PCADecoder(mean, comps)
    vae = ResVAE(**entry["hparams"])
    vae.load_state_dict(entry["state"])
    return ResVAEEncoder(vae), ResVAEDecoder(vae)


def module_device(m: nn.Module) -> torch.device:
    p = next(m.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _frozen(m: nn.Module, device: str | torch.device) -> nn.Module:
    return m.to(device).eval().requires_grad_(False)


def load_codecs(run_dir: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, tuple[nn.Module, nn.Module]]:
    blob = read_compressor(run_dir)
    out = {}
    for lv, entry in blob["levels"].items():
        enc, dec = _build(blob["method"], entry)
        out[lv] = (_frozen(enc, device), _frozen(dec, device))
    return out


def load_decoder(run_dir: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, nn.Module]:
    """{level: frozen module} mapping latents (N, c, H, W) -> features (N, C, H, W)."""
    return {lv: dec for lv, (_, dec) in load_codecs(run_dir, device).items()}


def load_encoder(run_dir: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, nn.Module]:
    """{level: frozen module} mapping features (N, C, H, W) -> latents (N, c, H, W)."""
    return {lv: enc for lv, (enc, _) in load_codecs(run_dir, device).items()}


def compressor_method(run_dir: str | os.PathLike) -> str:
    return read_compressor(run_dir)["method"]


@torch.no_grad()
def encode_maps(enc: nn.Module, maps: np.ndarray, batch: int) -> np.ndarray:
    """(n, T, C, H, W) float16 -> (n, T, c, H, W) float16, `batch` maps at a time."""
    n, t = maps.shape[:2]
    flat = maps.reshape(n * t, *maps.shape[2:])
    dev = module_device(enc)
    out = [enc(torch.from_numpy(np.asarray(flat[i:i + batch], np.float32)).to(dev)).cpu().numpy()
           for i in range(0, len(flat), batch)]
    z = np.concatenate(out)
    return z.reshape(n, t, *z.shape[1:]).astype(np.float16)


def compress_repo(repo: str | os.PathLike, run_dir: str | os.PathLike, out: str | os.PathLike,
                  batch: int = 32, progress: bool = True, device: str = "cpu") -> FeatureStore:
    """Write the latents of every item of `repo` into a repository at `out` (same format and
    shards; resumes at the first unfinished shard)."""
    src = FeatureStore.open(repo)
    if src.kind != "raw":
        raise ArtifactError(f"{repo}: is a '{src.kind}' repository; compress a raw one")
    method = compressor_method(run_dir)
    dev = resolve_device(device)
    enc = load_encoder(run_dir, dev)
    if set(enc) != set(src.levels):
        raise ArtifactError(f"{Path(run_dir) / COMPRESSOR}: levels {sorted(enc)} do not match "
                            f"repository {repo} levels {src.levels}")
    shapes = {}
    for lv in src.levels:
        _, ch, h, w = src.shape(lv)
        probe = enc[lv](torch.zeros(1, ch, h, w, device=dev))
        shapes[lv] = tuple(probe.shape[1:])
    meta = {**src.meta, "source_repo": str(Path(repo).resolve()),
            "compressor": str(Path(run_dir).resolve()), "method": method}
    # the source's shards, one for one: a grown source (new shards after the old) grows this one alike
    writer = StoreWriter(out, kind=method, levels=src.levels, timesteps=src.timesteps,
                         image_ids=src.image_ids, shapes=shapes, shard_size=src.shard_size, meta=meta,
                         ranges=[(int(sh["start"]), int(sh["count"])) for sh in src._shards])
    for k in tqdm(writer.pending(), desc=f"compress ({method})", disable=not progress):
        start, count = writer.ranges[k]
        arrays = {lv: encode_maps(enc[lv], src._map(lv, k), batch) for lv in src.levels}
        writer.write_shard(k, arrays)
    writer.finish()
    return FeatureStore.open(out)


@torch.no_grad()
def reconstruction_metrics(store: FeatureStore, codecs: dict[str, tuple[nn.Module, nn.Module]],
                           image_ids: list[str] | None = None, batch: int = 32,
                           levels: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Per level: mean cosine similarity (per feature map, flattened) and relative MSE
    (sum of squared error / sum of squares) of decode(encode(x)) against x."""
    ids = image_ids if image_ids is not None else store.image_ids
    result = {}
    for lv in levels or store.levels:
        enc, dec = codecs[lv]
        cos_sum, n_maps, err, ref = 0.0, 0, 0.0, 0.0
        for i in range(0, len(ids), batch):
            x = np.concatenate([store.get(iid)[lv] for iid in ids[i:i + batch]])
            x = torch.from_numpy(np.asarray(x, np.float32)).to(module_device(enc))
            y = dec(enc(x))
            cos_sum += float(torch.nn.functional.cosine_similarity(y.flatten(1), x.flatten(1), dim=1).sum())
            n_maps += x.shape[0]
            err += float((y - x).pow(2).sum())
            ref += float(x.pow(2).sum())
        result[lv] = {"cosine": cos_sum / n_maps, "rel_mse": err / max(ref, 1e-12)}
    return result


def compress_run(repo: str | os.PathLike, run_dir: str | os.PathLike, out: str | os.PathLike,
                 method: str | None = None, batch: int = 32, progress: bool = True,
                 device: str = "cpu") -> dict[str, Any]:
    """`d3n repo compress`: the compressed repository plus its config, metrics and manifest."""
    cfg = validate(RepoCompressConfig, {"repo": str(repo), "compressor": str(run_dir), "method": method,
                                        "batch": batch, "device": device}, "d3n repo compress")
    return compress_with(cfg, out, progress)


def _same_images(repo, out) -> bool:
    """False when the source repository has grown since `out` was written (it then extends)."""
    return FeatureStore.open(repo, verify=False).image_ids == FeatureStore.open(out, verify=False).image_ids


def compress_with(cfg: RepoCompressConfig, out: str | os.PathLike, progress: bool = True) -> dict[str, Any]:
    repo, run_dir, batch = cfg.repo, cfg.compressor, cfg.batch
    found = compressor_method(run_dir)
    if cfg.method is not None and cfg.method != found:
        raise ArtifactError(f"{Path(run_dir) / COMPRESSOR}: is a '{found}' compressor, not '{cfg.method}'")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # the output's identity: no device (a GPU-compressed repository is the same artifact)
    config = {"repo": repo, "compressor": run_dir, "method": found, "batch": batch}
    if is_complete(out, config=config) and _same_images(repo, out):
        return read_json(out / METRICS)
    dev = str(resolve_device(cfg.device))
    write_yaml(out / CONFIG, {**config, "device": cfg.device})
    manifest = Manifest(out, "repo-compress", inputs={"repo": Path(repo) / INDEX,
                                                      "compressor": Path(run_dir) / COMPRESSOR}, config=config)
    with manifest.timed("compress"):
        store = compress_repo(repo, run_dir, out, batch=batch, progress=progress, device=dev)
    raw = FeatureStore.open(repo, verify=False)
    metrics = {"method": found, "images": len(store), "raw_bytes": raw.nbytes(), "compressed_bytes": store.nbytes(),
               "ratio": store.nbytes() / raw.nbytes(), "raw_disk_bytes": raw.disk_bytes(),
               "compressed_disk_bytes": store.disk_bytes(), "disk_ratio": store.disk_bytes() / raw.disk_bytes(),
               "shapes": {lv: store.shape(lv) for lv in store.levels}, "device": dev}
    write_json(out / METRICS, metrics)
    manifest.complete(outputs=[INDEX, METRICS, CONFIG])
    return metrics
