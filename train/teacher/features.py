"""Feature mapping for the teacher (paper Fig. 5): latents from the compressed repository ->
frozen decoder -> DDPM features, warped into each training sample's frame.

Per level, the T timesteps' decoded maps are stacked on the channel axis, so the teacher sees
T x C channels of DDPM semantics at P3/P4/P5.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from d3n.errors import ArtifactError
from d3n.train.repository.compress import load_decoder
from d3n.train.repository.store import FeatureStore
from d3n.train.teacher.align import warp_pieces

LEVELS = ("p3", "p4", "p5")
STRIDES = {"p3": 8, "p4": 16, "p5": 32}
# Decoded features kept in memory between epochs on a CPU (float32, as decoded): the decoder is
# frozen, so an image's features never change, and at a 64 px DDPM decoding them is most of a
# teacher step on a CPU. D3N_FEATURE_CACHE_MB bounds it (0: off); NEU-DET's 1200 train images at
# 64 px need 3.3 GB. Features served from it equal fresh ones up to batch rounding (~1e-6).
CACHE_MB = "D3N_FEATURE_CACHE_MB"
DEFAULT_CACHE_MB = 4096


def cache_budget() -> int:
    value = os.environ.get(CACHE_MB, str(DEFAULT_CACHE_MB))
    if not value.isdigit():
        raise ArtifactError(f"{CACHE_MB}={value!r}: expected a whole number of megabytes (0 turns the cache off)")
    return int(value) * 2 ** 20


def derangement(ids: list[str], seed: int) -> dict[str, str]:
    """A seeded map from every id to another one (never itself): a shuffled order, each to the next."""
    if len(ids) < 2:
        raise ArtifactError(f"cannot give {len(ids)} image(s) each another image's features")
    order = [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]
    return {a: b for a, b in zip(order, order[1:] + order[:1], strict=True)}


class FeatureProvider:
    """Serves warped DDPM features for batches from `train/detector/data.py`'s DetectionDataset.

    The sources are repositories on disk (`FeatureStore`) or features computed on the fly
    (`train/teacher/live.py`); either gives the stored form (raw float16 maps or float16 latents)
    and the same frozen decoder maps it to the teacher's input."""

    def __init__(self, repos: list, compressor: Path | None = None, device: str = "cpu",
                 shuffle_seed: int | None = None):
        self.stores = [FeatureStore.open(r) if isinstance(r, str | Path) else r for r in repos]
        # the "shuffled" control: each image gets the features of another image of its split
        self.swap: dict[str, str] = {}
        if shuffle_seed is not None:
            for s in self.stores:
                self.swap.update(derangement(s.image_ids, shuffle_seed))
        kinds = {s.kind for s in self.stores}
        if len(kinds) != 1:
            raise ArtifactError(f"repositories {[str(s.root) for s in self.stores]} mix kinds {sorted(kinds)}")
        self.kind = kinds.pop()
        self.levels = self.stores[0].levels
        if tuple(self.levels) != LEVELS:
            raise ArtifactError(f"{self.stores[0].root}: levels {self.levels}, expected {list(LEVELS)}")
        self.device = torch.device(device)
        if self.kind == "raw":
            self.decoder = None  # the raw repository holds the features themselves
        else:
            compressor = Path(compressor or self.stores[0].meta.get("compressor", ""))
            if not compressor.exists():
                raise ArtifactError(f"{self.stores[0].root}: compressor run '{compressor}' not found (pass --resvae)")
            self.decoder = load_decoder(compressor, device=str(self.device))
        self.compressor = compressor if self.decoder is not None else None
        self.channels = self._probe_channels()
        self.cache: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()
        # on a GPU decoding is cheap and its memory is the model's: the cache is for CPU runs
        self.cache_bytes = 0
        self.budget = cache_budget() if self.decoder is not None and self.device.type == "cpu" else 0
        self.hits = self.misses = 0

    def _lookup(self, stem: str) -> dict[str, np.ndarray]:
        stem = self.swap.get(stem, stem)
        for s in self.stores:
            if s.has(stem):
                return s.get(stem)
        raise ArtifactError(f"image '{stem}' is in none of the repositories {[str(s.root) for s in self.stores]}")

    @torch.no_grad()
    def _decode(self, level: str, lat: np.ndarray) -> torch.Tensor:
        """(P, T, c, H, W) latents -> (P, T*C, H, W) features."""
        x = torch.from_numpy(np.ascontiguousarray(lat, dtype=np.float32)).to(self.device)
        p, t = x.shape[:2]
        x = x.flatten(0, 1)
        if self.decoder is not None:
            x = self.decoder[level](x)
        return x.reshape(p, t * x.shape[1], *x.shape[2:])

    def _probe_channels(self) -> dict[str, int]:
        sample = self.stores[0].get_index(0)
        return {lv: int(self._decode(lv, sample[lv][None]).shape[1]) for lv in self.levels}

    def _decoded(self, level: str, stems: list[str]) -> torch.Tensor:
        """(P, T*C, H, W) features of `stems`, decoded once per image while the budget lasts."""
        if self.budget == 0:
            return self._decode(level, np.stack([self._lookup(s)[level] for s in stems]))
        missing = [s for s in dict.fromkeys(stems) if (level, s) not in self.cache]
        self.hits += len(stems) - len(missing)
        self.misses += len(missing)
        fresh = {}
        if missing:
            feats = self._decode(level, np.stack([self._lookup(s)[level] for s in missing]))
            for s, f in zip(missing, feats, strict=True):
                fresh[s] = f.clone()  # its own storage, not a view that keeps the batch alive
                size = fresh[s].numel() * fresh[s].element_size()
                if self.cache_bytes + size <= self.budget:
                    self.cache[(level, s)] = fresh[s]
                    self.cache_bytes += size
        return torch.stack([fresh[s] if s in fresh else self.cache[(level, s)] for s in stems])

    @torch.no_grad()
    def __call__(self, pieces_per_sample: list[list], imgsz: int) -> dict[str, torch.Tensor]:
        stems = [p.stem for ps in pieces_per_sample for p in ps]
        out = {}
        for lv in self.levels:
            feats = self._decoded(lv, stems)
            hw = (imgsz // STRIDES[lv], imgsz // STRIDES[lv])
            out[lv] = warp_pieces(feats, pieces_per_sample, hw, STRIDES[lv])
        return out
