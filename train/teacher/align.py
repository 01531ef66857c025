"""Warp precomputed DDPM feature maps with the affine map their image went through.

The dataset (`train/detector/data.py`) records, for each source image in a sample, the 3x3 map `M` from source
pixels to output pixels and the visible source rectangle. For every cell of a detector level
(stride s), we take its centre in output pixels, map it back through M^-1 into the source image,
and sample the source's feature map there (bilinear, `grid_sample`). Cells whose source point lies
outside the visible rectangle get zeros; a mosaic sums its pieces, which never overlap.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def source_grid(pieces, out_hw: tuple[int, int], stride: float) -> tuple[np.ndarray, np.ndarray]:
    """For each piece: normalised sampling grid (P, h, w, 2) and validity mask (P, h, w)."""
    h, w = out_hw
    ys, xs = np.meshgrid((np.arange(h) + 0.5) * stride, (np.arange(w) + 0.5) * stride, indexing="ij")
    pts = np.stack([xs, ys, np.ones_like(xs)], -1).reshape(-1, 3)  # output pixel centres
    grids, masks = [], []
    for p in pieces:
        src = pts @ np.linalg.inv(p.M).T  # -> source pixels
        x, y = src[:, 0], src[:, 1]
        x1, y1, x2, y2 = p.rect
        valid = (x >= x1) & (x < x2) & (y >= y1) & (y < y2)
        sh, sw = p.src_hw
        # align_corners=False: -1 and 1 are the outer edges of the source image
        g = np.stack([x / sw * 2 - 1, y / sh * 2 - 1], -1)
        grids.append(g.reshape(h, w, 2))
        masks.append(valid.reshape(h, w))
    return np.stack(grids).astype(np.float32), np.stack(masks)


def warp_pieces(feats: torch.Tensor, pieces_per_sample: list[list], out_hw: tuple[int, int],
                stride: float) -> torch.Tensor:
    """Resample features into the detector's frame.

    feats: (P, C, Hf, Wf), one map per piece, in the order of the flattened `pieces_per_sample`.
    Returns (B, C, h, w) with B = len(pieces_per_sample).
    """
    flat = [p for ps in pieces_per_sample for p in ps]
    if feats.shape[0] != len(flat):
        raise ValueError(f"got {feats.shape[0]} feature maps for {len(flat)} pieces")
    grid, mask = source_grid(flat, out_hw, stride)
    grid_t = torch.from_numpy(grid).to(feats.device, feats.dtype)
    mask_t = torch.from_numpy(mask).to(feats.device, feats.dtype).unsqueeze(1)
    sampled = F.grid_sample(feats, grid_t, mode="bilinear", padding_mode="zeros", align_corners=False)
    sampled = sampled * mask_t
    owner = torch.tensor([i for i, ps in enumerate(pieces_per_sample) for _ in ps], device=feats.device)
    out = torch.zeros(len(pieces_per_sample), *sampled.shape[1:], device=feats.device, dtype=feats.dtype)
    return out.index_add_(0, owner, sampled)
