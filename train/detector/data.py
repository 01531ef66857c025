"""Detection dataset whose augmentations are affine maps that the DDPM features can follow.

Precomputed DDPM features describe the un-augmented image (docs/design.md, "Features follow the
image"). Every geometric step here (letterbox, mosaic, random scale/translate, horizontal flip) is
an affine map, and each sample records, per source image it draws from (a *piece*), the 3x3 matrix
`M` taking source-image pixels to output pixels and the rectangle of the source that is visible.
`d3n.train.teacher.align.warp_pieces` then resamples that image's feature maps with the same map, so the
features stay aligned with the pixels the detector sees. Rotation and shear are left out (the
ultralytics defaults are 0 for both), so boxes transform exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from d3n.data.layout import DatasetLayout
from d3n.errors import DataError


@dataclass
class AugmentConfig:
    """Geometric/colour augmentation; defaults are ultralytics' detection defaults."""

    mosaic: float = 1.0  # probability of a 4-image mosaic
    scale: float = 0.5  # random zoom in [1 - scale, 1 + scale]
    translate: float = 0.1  # random shift, fraction of imgsz
    fliplr: float = 0.5
    hsv_h: float = 0.015
    hsv_s: float = 0.7
    hsv_v: float = 0.4


NO_AUGMENT = AugmentConfig(mosaic=0.0, scale=0.0, translate=0.0, fliplr=0.0, hsv_h=0.0, hsv_s=0.0, hsv_v=0.0)


def translate(tx: float, ty: float) -> np.ndarray:
    return np.array([[1, 0, tx], [0, 1, ty], [0, 0, 1]], np.float64)


def scale(sx: float, sy: float | None = None) -> np.ndarray:
    return np.diag([sx, sx if sy is None else sy, 1.0])


def flip_lr(width: int) -> np.ndarray:
    return np.array([[-1, 0, width], [0, 1, 0], [0, 0, 1]], np.float64)


@dataclass
class Piece:
    """One source image's contribution to a sample."""

    index: int  # index of the source image in the split
    stem: str  # its file stem: the image id in the feature repository
    M: np.ndarray  # 3x3, source pixel (x, y, 1) -> output pixel
    rect: tuple[float, float, float, float]  # visible part of the source, in source pixels x1 y1 x2 y2
    src_hw: tuple[int, int]  # source image height, width


class DetectionDataset(Dataset):
    """Images + YOLO labels of one split, with affine-tracked augmentation.

    Items: dict(img uint8 tensor (3, S, S) RGB, labels float32 (n, 5) [cls cx cy w h] normalised to S,
    pieces list[Piece], index int, path str).
    """

    def __init__(self, data: str | Path, split: str, imgsz: int, augment: AugmentConfig = NO_AUGMENT,
                 seed: int = 0):
        self.layout = DatasetLayout.open(data)
        self.split = split
        self.files = self.layout.images(split)
        if not self.files:
            raise DataError(f"{self.layout.splits[split]}: split '{split}' has no images")
        self.labels = [self.layout.labels(f) for f in self.files]
        self.imgsz = imgsz
        self.aug = augment
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.files)

    @property
    def stems(self) -> list[str]:
        return [f.stem for f in self.files]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _rng(self, index: int) -> np.random.Generator:
        # Seeded per (seed, epoch, index): the same run sees the same augmentations, whatever the workers.
        return np.random.default_rng([self.seed, self.epoch, index])

    def load(self, index: int) -> np.ndarray:
        path = self.files[index]
        img = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if img is None:
            raise DataError(f"{path}: cannot read image")
        return img

    def boxes_px(self, index: int, hw: tuple[int, int]) -> np.ndarray:
        """Labels of an image as (n, 5) [cls x1 y1 x2 y2] in source pixels."""
        lab = self.labels[index]
        h, w = hw
        out = np.zeros((len(lab), 5), np.float64)
        out[:, 0] = lab[:, 0]
        out[:, 1] = (lab[:, 1] - lab[:, 3] / 2) * w
        out[:, 2] = (lab[:, 2] - lab[:, 4] / 2) * h
        out[:, 3] = (lab[:, 1] + lab[:, 3] / 2) * w
        out[:, 4] = (lab[:, 2] + lab[:, 4] / 2) * h
        return out

    def __getitem__(self, index: int) -> dict:
        rng = self._rng(index)
        if self.aug.mosaic > 0 and rng.random() < self.aug.mosaic:
            canvas, boxes, pieces, size = self._mosaic(index, rng)
        else:
            canvas, boxes, pieces, size = self._single(index)
        img, boxes, pieces = self._final_affine(canvas, boxes, pieces, size, rng)
        if self.aug.hsv_h or self.aug.hsv_s or self.aug.hsv_v:
            img = augment_hsv(img, self.aug, rng)
        labels = to_yolo(boxes, self.imgsz)
        rgb = np.ascontiguousarray(img[:, :, ::-1].transpose(2, 0, 1))
        return {"img": torch.from_numpy(rgb), "labels": torch.from_numpy(labels), "pieces": pieces,
                "index": index, "path": str(self.files[index])}

    def _single(self, index: int):
        """Letterbox one image into an imgsz x imgsz canvas (as ultralytics' val letterbox)."""
        img = self.load(index)
        h, w = img.shape[:2]
        s = self.imgsz
        r = min(s / h, s / w)
        nw, nh = round(w * r), round(h * r)
        dx, dy = (s - nw) / 2, (s - nh) / 2
        left, top = round(dx - 0.1), round(dy - 0.1)
        M = translate(left, top) @ scale(nw / w, nh / h)
        canvas = np.full((s, s, 3), 114, np.uint8)
        canvas[top:top + nh, left:left + nw] = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR)
        boxes = transform_boxes(self.boxes_px(index, (h, w)), M)
        return canvas, boxes, [Piece(index, self.files[index].stem, M, (0.0, 0.0, float(w), float(h)), (h, w))], s

    def _mosaic(self, index: int, rng: np.random.Generator):
        """4-image mosaic on a 2S canvas around a random centre; each piece is a translated crop."""
        s = self.imgsz
        others = rng.integers(0, len(self), size=3)
        xc, yc = (int(rng.uniform(s * 0.5, s * 1.5)) for _ in range(2))
        canvas = np.full((2 * s, 2 * s, 3), 114, np.uint8)
        all_boxes, pieces = [], []
        for k, i in enumerate([index, *others.tolist()]):
            img = self.load(i)
            h0, w0 = img.shape[:2]
            r = s / max(h0, w0)
            w, h = max(1, round(w0 * r)), max(1, round(h0 * r))
            img = cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)
            # canvas rect (a) and crop of the resized image (b), as ultralytics' mosaic places them
            if k == 0:
                a = (max(xc - w, 0), max(yc - h, 0), xc, yc)
                b = (w - (a[2] - a[0]), h - (a[3] - a[1]), w, h)
            elif k == 1:
                a = (xc, max(yc - h, 0), min(xc + w, 2 * s), yc)
                b = (0, h - (a[3] - a[1]), min(w, a[2] - a[0]), h)
            elif k == 2:
                a = (max(xc - w, 0), yc, xc, min(2 * s, yc + h))
                b = (w - (a[2] - a[0]), 0, w, min(a[3] - a[1], h))
            else:
                a = (xc, yc, min(xc + w, 2 * s), min(2 * s, yc + h))
                b = (0, 0, min(w, a[2] - a[0]), min(a[3] - a[1], h))
            canvas[a[1]:a[3], a[0]:a[2]] = img[b[1]:b[3], b[0]:b[2]]
            M = translate(a[0] - b[0], a[1] - b[1]) @ scale(w / w0, h / h0)
            rect = (b[0] * w0 / w, b[1] * h0 / h, b[2] * w0 / w, b[3] * h0 / h)
            boxes = clip_boxes(self.boxes_px(i, (h0, w0)), rect)
            all_boxes.append(transform_boxes(boxes, M))
            pieces.append(Piece(int(i), self.files[i].stem, M, rect, (h0, w0)))
        return canvas, np.concatenate(all_boxes), pieces, 2 * s

    def _final_affine(self, canvas, boxes, pieces, size, rng):
        """Random scale/translate (+ flip) from the canvas to the S x S output, as one affine map."""
        s = self.imgsz
        zoom = rng.uniform(1 - self.aug.scale, 1 + self.aug.scale) if self.aug.scale else 1.0
        tx = rng.uniform(0.5 - self.aug.translate, 0.5 + self.aug.translate) * s if self.aug.translate else s / 2
        ty = rng.uniform(0.5 - self.aug.translate, 0.5 + self.aug.translate) * s if self.aug.translate else s / 2
        if size == s and zoom == 1.0 and tx == s / 2 and ty == s / 2:
            A = np.eye(3)
        else:
            # centre the canvas, zoom, then move the centre to (tx, ty); a 2S mosaic is cut to S
            A = translate(tx, ty) @ scale(zoom) @ translate(-size / 2, -size / 2)
        if self.aug.fliplr and rng.random() < self.aug.fliplr:
            A = flip_lr(s) @ A
        if not np.allclose(A, np.eye(3)):
            # A works on continuous coordinates (pixel i spans [i, i+1]); OpenCV puts pixel centres on
            # integers, so shift by half a pixel on both sides.
            A_cv = translate(-0.5, -0.5) @ A @ translate(0.5, 0.5)
            canvas = cv2.warpAffine(canvas, A_cv[:2], (s, s), flags=cv2.INTER_LINEAR, borderValue=(114, 114, 114))
        boxes = filter_boxes(transform_boxes(boxes, A), s)
        pieces = [Piece(p.index, p.stem, A @ p.M, p.rect, p.src_hw) for p in pieces]
        return canvas, boxes, pieces


def transform_boxes(boxes: np.ndarray, M: np.ndarray) -> np.ndarray:
    """Map [cls x1 y1 x2 y2] boxes through a scale/translate/flip affine M (axis-aligned stays so)."""
    if not len(boxes):
        return boxes.reshape(0, 5)
    pts = np.stack([boxes[:, [1, 2]], boxes[:, [3, 4]]], 1)  # (n, 2, 2)
    ones = np.ones((*pts.shape[:2], 1))
    mapped = np.concatenate([pts, ones], -1) @ M[:2].T
    out = boxes.copy()
    out[:, 1] = mapped[..., 0].min(1)
    out[:, 3] = mapped[..., 0].max(1)
    out[:, 2] = mapped[..., 1].min(1)
    out[:, 4] = mapped[..., 1].max(1)
    return out


def clip_boxes(boxes: np.ndarray, rect: tuple[float, float, float, float]) -> np.ndarray:
    out = boxes.copy()
    out[:, [1, 3]] = out[:, [1, 3]].clip(rect[0], rect[2])
    out[:, [2, 4]] = out[:, [2, 4]].clip(rect[1], rect[3])
    return out


def filter_boxes(boxes: np.ndarray, size: int, min_px: float = 2.0, min_keep: float = 0.1) -> np.ndarray:
    """Clip to the output and drop boxes that became slivers (as ultralytics' box candidates)."""
    if not len(boxes):
        return boxes.reshape(0, 5)
    w0, h0 = boxes[:, 3] - boxes[:, 1], boxes[:, 4] - boxes[:, 2]
    out = boxes.copy()
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, size)
    out[:, [2, 4]] = out[:, [2, 4]].clip(0, size)
    w, h = out[:, 3] - out[:, 1], out[:, 4] - out[:, 2]
    keep = (w > min_px) & (h > min_px) & (w * h > min_keep * w0 * h0)
    return out[keep]


def to_yolo(boxes: np.ndarray, size: int) -> np.ndarray:
    out = np.zeros((len(boxes), 5), np.float32)
    if len(boxes):
        out[:, 0] = boxes[:, 0]
        out[:, 1] = (boxes[:, 1] + boxes[:, 3]) / 2 / size
        out[:, 2] = (boxes[:, 2] + boxes[:, 4]) / 2 / size
        out[:, 3] = (boxes[:, 3] - boxes[:, 1]) / size
        out[:, 4] = (boxes[:, 4] - boxes[:, 2]) / size
    return out


def augment_hsv(img: np.ndarray, aug: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    gains = rng.uniform(-1, 1, 3) * [aug.hsv_h, aug.hsv_s, aug.hsv_v] + 1
    hue, sat, val = cv2.split(cv2.cvtColor(img, cv2.COLOR_BGR2HSV))
    x = np.arange(0, 256, dtype=np.float64)
    lut_h = ((x * gains[0]) % 180).astype(np.uint8)
    lut_s = np.clip(x * gains[1], 0, 255).astype(np.uint8)
    lut_v = np.clip(x * gains[2], 0, 255).astype(np.uint8)
    hsv = cv2.merge((cv2.LUT(hue, lut_h), cv2.LUT(sat, lut_s), cv2.LUT(val, lut_v)))
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)


def collate(items: list[dict]) -> dict:
    """Batch in the ultralytics loss format (batch_idx, cls, bboxes) plus the pieces per image."""
    imgs = torch.stack([it["img"] for it in items])
    labels = [it["labels"] for it in items]
    batch_idx = torch.cat([torch.full((len(lab),), i, dtype=torch.float32) for i, lab in enumerate(labels)])
    lab = torch.cat(labels) if labels else torch.zeros(0, 5)
    return {"img": imgs, "batch_idx": batch_idx, "cls": lab[:, :1], "bboxes": lab[:, 1:],
            "pieces": [it["pieces"] for it in items], "index": [it["index"] for it in items],
            "paths": [it["path"] for it in items]}


def seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    cv2.setNumThreads(0)

