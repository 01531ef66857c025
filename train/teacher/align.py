"""Warp precomputed DDPM feature maps with the affine map their image went through.

The dataset (`train/detector/data.py`) records, for each source image in a sample, the 3x3 map `M` from source
pixels to output pixels and the visible source rectangle. For every cell of a detector level
(stride s), we take its centre in output pixels, map it back through M^-1 into the source image,
and sample the source's feature map there (bilinear, `grid_sample`). Cells whose source point lies
outside the visible rectangle get zeros; a mosaic sums its pieces, which never overlap.

When the feature map is finer than the level's grid (a DDPM input larger than imgsz / 8: a cell
covers k >= 2 feature cells per side), one sample per cell would keep one feature cell in k^2 and
alias the rest away. The cell is then sampled at k x k points spread over it and averaged: the
mean of the features it covers, as pooling would give, through any affine map (over the points
that fall on a visible source, on the edge of an image or a mosaic piece).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

MAX_SUB = 8  # points per cell side at most


def subsamples(feat_hw: tuple[int, int], out_hw: tuple[int, int]) -> int:
    """Points per cell side: how many feature cells one level cell covers per side at the
    dataset's own scale (the feature map against the level's grid: 64 vs 16 is 4), 1 under two.
    Taken from the sizes, not from each sample's augmentation, so a config whose DDPM map matches
    the grid samples exactly as it always has, whatever the augmentation."""
    covered = min(feat_hw[0] / out_hw[0], feat_hw[1] / out_hw[1])
    return int(min(MAX_SUB, max(1.0, np.floor(covered))))


def source_grid(pieces, out_hw: tuple[int, int], stride: float, sub: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """For each piece: normalised sampling grid (P, h*sub, w*sub, 2) and validity mask (P, h*sub,
    w*sub); `sub` points per cell side, evenly spread over the cell (its centre when 1)."""
    h, w = out_hw[0] * sub, out_hw[1] * sub
    step = stride / sub
    ys, xs = np.meshgrid((np.arange(h) + 0.5) * step, (np.arange(w) + 0.5) * step, indexing="ij")
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
    sub = subsamples(tuple(feats.shape[-2:]), out_hw)
    grid, mask = source_grid(flat, out_hw, stride, sub)
    grid_t = torch.from_numpy(grid).to(feats.device, feats.dtype)
    mask_t = torch.from_numpy(mask).to(feats.device, feats.dtype).unsqueeze(1)
    sampled = F.grid_sample(feats, grid_t, mode="bilinear", padding_mode="zeros", align_corners=False)
    sampled = sampled * mask_t
    owner = torch.tensor([i for i, ps in enumerate(pieces_per_sample) for _ in ps], device=feats.device)
    if sub == 1:
        out = torch.zeros(len(pieces_per_sample), *sampled.shape[1:], device=feats.device, dtype=feats.dtype)
        return out.index_add_(0, owner, sampled)
    # each cell: the mean over its points that fall on a visible source (a cell on the edge of an
    # image gets the mean of its visible part, as a cell whose centre is visible gets a full value)
    sums = F.avg_pool2d(sampled, sub)
    cover = F.avg_pool2d(mask_t, sub)
    b = len(pieces_per_sample)
    total = torch.zeros(b, *sums.shape[1:], device=feats.device, dtype=feats.dtype).index_add_(0, owner, sums)
    covered = torch.zeros(b, *cover.shape[1:], device=feats.device, dtype=feats.dtype).index_add_(0, owner, cover)
    return torch.where(covered > 0, total / covered.clamp_min(1e-12), torch.zeros_like(total))
