"""Region-of-interest mask: keep only detections whose box centre lies on the mask.

The mask is any image file; its non-zero pixels are the region. It is resized (nearest) to each
frame size, so one mask serves a camera whatever resolution it delivers.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from d3n.errors import DataError
from d3n.runtime.postprocess import Detections


class RoiMask:
    def __init__(self, mask: np.ndarray, source: str = "<array>"):
        if mask.ndim == 3:
            mask = mask.max(axis=2)
        if mask.ndim != 2 or mask.size == 0:
            raise DataError(f"{source}: ROI mask must be a 2-D image")
        if not mask.any():
            raise DataError(f"{source}: ROI mask is empty (no non-zero pixel); every detection would be dropped")
        self.mask = mask > 0
        self.source = source
        self._cache: dict[tuple[int, int], np.ndarray] = {}

    @classmethod
    def load(cls, path: str | Path) -> RoiMask:
        img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        if img is None:
            raise DataError(f"{path}: cannot read the ROI mask (missing or not an image)")
        return cls(img, str(path))

    def for_shape(self, h: int, w: int) -> np.ndarray:
        key = (h, w)
        if key not in self._cache:
            m = self.mask.astype(np.uint8)
            self._cache[key] = cv2.resize(m, (w, h), interpolation=cv2.INTER_NEAREST) > 0
        return self._cache[key]

    def filter(self, det: Detections, frame_shape: tuple[int, ...]) -> Detections:
        """Detections whose box centre falls on a non-zero mask pixel."""
        if not len(det):
            return det
        h, w = frame_shape[:2]
        m = self.for_shape(h, w)
        cx = np.clip(((det.xyxy[:, 0] + det.xyxy[:, 2]) / 2).astype(np.int64), 0, w - 1)
        cy = np.clip(((det.xyxy[:, 1] + det.xyxy[:, 3]) / 2).astype(np.int64), 0, h - 1)
        return det.select(m[cy, cx])
