"""Teacher features for any image, computed on the fly (a test split, or new images, that no
repository holds).

The same path a repository takes, one image at a time: the image resized to the DDPM size, noised
at each t with the noise seeded by its id (Eq. 2), the decoder maps caught, stored as float16, and
for a compressed repository passed through the compressor's encoder and stored as float16 again.
So `get(stem)` returns what `d3n repo build` + `d3n repo compress` would have stored for that image,
and `FeatureProvider` decodes it exactly as it decodes a repository.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from d3n.errors import ArtifactError
from d3n.train.ddpm.features import DecoderFeatures
from d3n.train.ddpm.model import DDPM, load_images
from d3n.train.repository.compress import compressor_method, encode_maps, load_encoder
from d3n.train.teacher.features import LEVELS


class LiveRepository:
    """A read-only repository whose items are computed when asked for (see the module docstring)."""

    def __init__(self, ddpm_run: Path, timesteps: list[int], images: dict[str, Path],
                 compressor: Path | None = None, device: str = "cpu"):
        self.root = Path(ddpm_run)
        self.timesteps = [int(t) for t in timesteps]
        self.images = dict(images)
        self.image_ids = list(self.images)
        self.device = torch.device(device)
        ddpm = DDPM.load(ddpm_run, self.device)
        self.size = ddpm.size
        self.extractor = DecoderFeatures(ddpm.unet, ddpm.scheduler, ddpm.size)
        self.levels = list(self.extractor.hooks)
        if tuple(self.levels) != LEVELS:
            raise ArtifactError(f"{ddpm_run}: DDPM levels {self.levels}, expected {list(LEVELS)}")
        self.encoder = load_encoder(compressor, self.device) if compressor is not None else None
        self.kind = compressor_method(compressor) if compressor is not None else "raw"
        self.meta = {"compressor": str(compressor) if compressor is not None else None, "ddpm_run": str(ddpm_run)}

    def has(self, image_id: str) -> bool:
        return image_id in self.images

    @torch.no_grad()
    def get(self, image_id: str) -> dict[str, np.ndarray]:
        if image_id not in self.images:
            raise ArtifactError(f"image '{image_id}' was not given to the on-the-fly feature source")
        x = load_images([self.images[image_id]], self.size)
        maps = self.extractor(x, [image_id], self.timesteps)  # {level: (1, T, C, H, W) float32}
        out = {}
        for lv, m in maps.items():
            stored = m.numpy().astype(np.float16)  # as a raw repository stores it
            if self.encoder is not None:
                stored = encode_maps(self.encoder[lv], stored, batch=len(self.timesteps))
            out[lv] = stored[0]
        return out

    def get_index(self, i: int) -> dict[str, np.ndarray]:
        return self.get(self.image_ids[i])
