"""`d3n repo build`: the raw feature repository of one split (paper §III-B, Fig. 3).

Each image is noised to x_t for every t in `timesteps` (default {100, 150, 250}, paper §III-B)
and the DDPM decoder's p3/p4/p5 maps are stored as float16 shards. Only the train split's
repository is used to fit the compressor; the val split is built the same way, from the same
DDPM, for evaluating the teacher. A killed build resumes at the first unfinished shard. When
images were added to the split since a build finished (`d3n data add`), building again extends
it: the new images go into new shards after the old ones, which are left as they are.

`--device` only says where the UNet runs: the seeded noise is drawn on the CPU and moved, and the
device stays out of the repository's index and identity, so a build (or a resumed one) on GPU
makes the same artifact as one on CPU, up to floating-point rounding of the UNet itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from d3n import distributed
from d3n.artifacts import (
    CONFIG,
    METRICS,
    Manifest,
    is_complete,
    read_json,
    sha256_file,
    write_json,
    write_yaml,
)
from d3n.config import StrictModel, identity
from d3n.data.layout import DatasetLayout
from d3n.errors import ConfigError
from d3n.train.ddpm.features import DecoderFeatures
from d3n.train.ddpm.model import DDPM, WEIGHTS, load_images
from d3n.train.device import Device, resolve_device
from d3n.train.repository.store import INDEX, FeatureStore, StoreWriter, shard_ranges

DEFAULT_TIMESTEPS = (100, 150, 250)  # paper §III-B


class RepoBuildConfig(StrictModel):
    ddpm: str
    data: str
    split: str = "train"
    timesteps: list[int] = list(DEFAULT_TIMESTEPS)
    shard_size: int = 64  # images per shard
    batch: int = 8
    device: Device = "cpu"  # cpu, cuda, cuda:N or auto; not part of the repository's identity


def parse_timesteps(text: str) -> list[int]:
    try:
        ts = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ConfigError(f"--timesteps: expected comma-separated integers, got '{text}'") from None
    if not ts or any(not 0 <= t < 1000 for t in ts):
        raise ConfigError(f"--timesteps: need integers in [0, 1000), got '{text}'")
    return ts


def build_repo(cfg: RepoBuildConfig, out: str | Path, progress: bool = True,
               world: distributed.World | None = None) -> dict[str, Any]:
    """Under torchrun the shards are shared out among the ranks (each image's noise is seeded by
    the image, so the repository is the one a single process makes); rank 0 gathers and writes."""
    out = Path(out)
    world = world or distributed.world()
    weights = Path(cfg.ddpm) / WEIGHTS
    data = DatasetLayout.open(cfg.data)
    paths = data.images(cfg.split)
    if not paths:
        raise ConfigError(f"{data.yaml_path}: split '{cfg.split}' has no images")
    ids, ranges, grown = _plan_ids(out, [p.stem for p in paths], cfg.shard_size)
    if not grown and weights.exists() and is_complete(out, inputs={"ddpm": weights, "data_yaml": data.yaml_path},
                                                      config=identity(cfg)):
        return read_json(out / METRICS)
    by_stem = {p.stem: p for p in paths}
    paths = [by_stem[i] for i in ids]
    device = resolve_device(cfg.device)
    ddpm = DDPM.load(cfg.ddpm, device)
    extractor = DecoderFeatures(ddpm.unet, ddpm.scheduler, ddpm.size)
    if world.main:
        out.mkdir(parents=True, exist_ok=True)
        write_yaml(out / CONFIG, cfg.model_dump())
    manifest = Manifest(out, "repo", inputs={"ddpm": weights, "data_yaml": data.yaml_path},
                        config=identity(cfg))
    meta = {"ddpm_size": ddpm.size, "ddpm_run": str(Path(cfg.ddpm).resolve()), "ddpm_sha256": sha256_file(weights),
            "data_yaml": str(data.yaml_path.resolve()), "split": cfg.split, "hooks": extractor.hooks,
            "compressor": None}
    if grown:  # which DDPM made which images: the old shards keep theirs, the new ones are this one's
        old = FeatureStore.open(out, verify=False)
        builds = old.meta.get("builds") or [{"images": len(old), "ddpm_sha256": old.meta.get("ddpm_sha256")}]
        meta["builds"] = [*builds, {"images": len(ids) - len(old), "ddpm_sha256": meta["ddpm_sha256"]}]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{data.splits[cfg.split]}: duplicate image stems (ids must be unique)")
    writer = StoreWriter(out, kind="raw", levels=list(extractor.hooks), timesteps=cfg.timesteps,
                         image_ids=ids, shapes=extractor.shapes(), shard_size=cfg.shard_size, meta=meta,
                         ranges=ranges) if world.main else None
    todo = (writer.ranges, writer.pending()) if world.main else None
    all_ranges, pending = distributed.broadcast(todo) if world.distributed else todo

    def extract(k: int) -> dict[str, Any]:
        start, count = all_ranges[k]
        parts: dict[str, list[torch.Tensor]] = {lv: [] for lv in extractor.hooks}
        for b in range(start, start + count, cfg.batch):
            sl = slice(b, min(b + cfg.batch, start + count))
            feats = extractor(load_images(paths[sl], ddpm.size), ids[sl], cfg.timesteps)
            for lv, f in feats.items():
                parts[lv].append(f)
        return {lv: torch.cat(v).numpy() for lv, v in parts.items()}

    with manifest.timed("extract"):
        rounds = range(0, len(pending), world.size)  # round r: rank i extracts shard pending[r + i]
        for r in tqdm(rounds, desc=f"repo build ({cfg.split})", disable=not (progress and world.main)):
            k = pending[r + world.rank] if r + world.rank < len(pending) else None
            done = [(k, extract(k) if k is not None else None)]
            if world.distributed:
                done = distributed.gather(done[0])
            for kk, arrays in done if world.main else ():
                if kk is not None:
                    writer.write_shard(kk, arrays)
    if not world.main:
        return {}
    writer.finish()
    store = FeatureStore.open(out)
    metrics = {"images": len(ids), "timesteps": cfg.timesteps, "shards": len(writer.ranges),
               "shards_built_this_run": len(pending),
               "images_built_this_run": sum(writer.ranges[k][1] for k in pending),
               "bytes": store.nbytes(), "disk_bytes": store.disk_bytes(),
               "shapes": {lv: store.shape(lv) for lv in store.levels}, "hooks": extractor.hooks,
               "device": str(device), "processes": world.size}
    write_json(out / METRICS, metrics)
    _complete_with_levels(manifest, extractor.hooks)
    return metrics


def _plan_ids(out: Path, stems: list[str], shard_size: int):
    """(ids in repository order, shard ranges or None, grown): a finished repository whose images
    are all still in the split keeps its order and shards and takes the new ones after them; one
    that lost images is rebuilt from scratch (its features would no longer be the split's)."""
    if not (out / INDEX).exists():
        return stems, None, False
    old = FeatureStore.open(out, verify=False)
    new = sorted(set(stems) - set(old.image_ids))
    ranges = [(int(s["start"]), int(s["count"])) for s in old._shards]
    if not new and set(old.image_ids) == set(stems):  # the same images: its own order and shards
        return old.image_ids, ranges, False
    if not new or not set(old.image_ids) <= set(stems):
        return stems, None, False
    start = len(old.image_ids)
    ranges += [(start + s, c) for s, c in shard_ranges(len(new), shard_size)]
    return old.image_ids + new, ranges, True


def _complete_with_levels(manifest: Manifest, hooks: dict[str, str]) -> None:
    """Complete the manifest, recording which UNet hook each level came from."""
    path = manifest.complete(outputs=[INDEX, METRICS])
    write_json(path, {**read_json(path), "levels": hooks})
