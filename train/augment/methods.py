"""The ways `d3n augment` draws a defect of class `cls` into `target.mask` of an image (uint8
RGB); each returns the new image. Pixels outside the region a method may change are the
original's, bit for bit: the mask for inpaint and paste, mask plus transition band for blend,
the box for sdedit and noise.

- `paste`: a real defect of the class (a crop around one of its boxes) cloned into the mask with
  OpenCV's Poisson seamless cloning: the classical baseline.
- `sdedit`: the window around the box noised to `strength` and denoised by the generator,
  conditioned on the class; the box's part feathered back in.
- `inpaint`: the masked part of the window generated (RePaint), the rest kept.
- `blend`: blended diffusion with a defect / transition / background mask: the background kept
  exactly, the transition band a soft mix that harmonises the new defect with its surroundings.
- `noise`: a control, not a defect: the whole box filled with colour noise at the image's own mean
  and spread. What a generator's gain is worth beyond "an odd patch labelled as the class" (an
  undertrained generator draws little else).
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

from d3n.errors import DataError
from d3n.train.augment.params import Params
from d3n.train.augment.placement import Target, mask_box
from d3n.train.generator.crops import Crop, from_model, read_rgb, to_model, window_around


def _window(gen, target: Target, h: int, w: int) -> tuple[int, int, int, int]:
    c = gen.config
    return window_around(target.box, w, h, float(c["context"]), int(c["min_side"]))


def fit_window(gen, target: Target, h: int, w: int) -> Target:
    """The generator draws in a square window no larger than the image's shorter side: a mask
    that does not fit is cut to the window, so the label is the box of what is really drawn."""
    x0, y0, x1, y1 = _window(gen, target, h, w)
    inside = np.zeros_like(target.mask)
    inside[y0:y1, x0:x1] = target.mask[y0:y1, x0:x1]
    if np.array_equal(inside, target.mask):
        return target
    return Target(target.image, inside, mask_box(inside), f"{target.source}, cut to the generator's window")


def _as_tensor(patch: np.ndarray, size: int) -> torch.Tensor:
    return torch.from_numpy(to_model(patch, size))[None]


def _small(mask: np.ndarray, size: int) -> torch.Tensor:
    return torch.from_numpy(cv2.resize(mask.astype(np.float32), (size, size), interpolation=cv2.INTER_LINEAR))[None, None]


def sdedit(image, target, cls, rng, gen, p: Params):
    h, w = image.shape[:2]
    x0, y0, x1, y1 = _window(gen, target, h, w)
    patch = image[y0:y1, x0:x1]
    out = gen.sdedit(_as_tensor(patch, gen.size), torch.tensor([cls]), p.strength, p.guidance, p.steps,
                     torch.Generator().manual_seed(int(rng.integers(2**31))))
    new = from_model(out[0].cpu().numpy(), x1 - x0, y1 - y0)
    # the window is the generator's context; only the box takes the new pixels, feathered inward over
    # a quarter of its shorter side: a neighbouring defect in the window keeps its pixels and its label
    bx0, by0, bx1, by1 = target.box
    box = np.zeros(patch.shape[:2], np.uint8)
    box[max(by0 - y0, 0):by1 - y0, max(bx0 - x0, 0):bx1 - x0] = 1
    depth = cv2.distanceTransform(box, cv2.DIST_L2, 3)  # 0 outside the box, 1 on its edge, more inside
    alpha = np.clip(depth / max(min(bx1 - bx0, by1 - by0) / 4, 1), 0, 1)[..., None]
    result = image.copy()
    result[y0:y1, x0:x1] = np.where(alpha > 0, patch + alpha * (new.astype(np.float32) - patch), patch).round()
    return result


def noise(image, target, rng):
    x0, y0, x1, y1 = target.box
    pixels = image.reshape(-1, 3).astype(np.float32)
    new = rng.normal(pixels.mean(0), pixels.std(0) + 1, (y1 - y0, x1 - x0, 3))
    result = image.copy()
    result[y0:y1, x0:x1] = np.clip(new, 0, 255).round()  # the whole box, no feathering
    return result


def inpaint(image, target, cls, rng, gen, p: Params):
    h, w = image.shape[:2]
    x0, y0, x1, y1 = _window(gen, target, h, w)
    patch, region = image[y0:y1, x0:x1], target.mask[y0:y1, x0:x1]
    keep = (_small(~region, gen.size) > 0.999).float().expand(1, 3, gen.size, gen.size)  # 1: known
    out = gen.inpaint(_as_tensor(patch, gen.size), keep, torch.tensor([cls]), p.guidance, p.steps,
                      torch.Generator().manual_seed(int(rng.integers(2**31))))
    new = from_model(out[0].cpu().numpy(), x1 - x0, y1 - y0)
    result = image.copy()
    result[y0:y1, x0:x1] = np.where(region[..., None], new, patch)
    return result


def blend(image, target, cls, rng, gen, p: Params):
    h, w = image.shape[:2]
    x0, y0, x1, y1 = _window(gen, target, h, w)
    patch, region = image[y0:y1, x0:x1], target.mask[y0:y1, x0:x1]
    bx0, by0, bx1, by1 = target.box
    band = max(2.0, p.transition * min(bx1 - bx0, by1 - by0))
    dist = cv2.distanceTransform((~region).astype(np.uint8), cv2.DIST_L2, 3)  # pixels from the defect
    alpha = np.clip(1 - dist / band, 0, 1)  # 1 in the defect, falling to 0 across the band
    out = gen.blend(_as_tensor(patch, gen.size), _small(alpha, gen.size), torch.tensor([cls]), p.guidance,
                    p.steps, torch.Generator().manual_seed(int(rng.integers(2**31))))
    new = from_model(out[0].cpu().numpy(), x1 - x0, y1 - y0).astype(np.float32)
    a = alpha[..., None]
    result = image.copy()
    result[y0:y1, x0:x1] = np.where(a > 0, patch + a * (new - patch), patch).round()
    return result


def paste(image, target, cls, rng, donors: list[Crop], p: Params):
    own = [d for d in donors if d.cls == cls]
    if not own:
        raise DataError(f"class {cls}: no real defect of it in the train split to paste")
    donor = own[int(rng.integers(len(own)))]
    src = read_rgb(donor.image)
    dx0, dy0, dx1, dy1 = donor.box
    bx0, by0, bx1, by1 = target.box
    bw, bh = bx1 - bx0, by1 - by0
    piece = cv2.resize(src[dy0:max(dy1, dy0 + 1), dx0:max(dx1, dx0 + 1)], (bw, bh), interpolation=cv2.INTER_AREA)
    # seamlessClone needs the source patch and a border inside the destination: pad by one pixel
    padded = cv2.copyMakeBorder(piece, 1, 1, 1, 1, cv2.BORDER_REFLECT)
    mask = np.zeros(padded.shape[:2], np.uint8)
    mask[1:-1, 1:-1] = target.mask[by0:by1, bx0:bx1] * 255
    # OpenCV centres the mask's bounding box (here the target box) on `center`
    center = (bx0 + bw // 2, by0 + bh // 2)
    cloned = cv2.seamlessClone(padded, image, mask, center, cv2.NORMAL_CLONE)
    return np.where(target.mask[..., None], cloned, image)
