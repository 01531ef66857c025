"""Images for calibration and parity checks, prepared by the runtime's own preprocessing.

INT8 scales calibrated on differently prepared images (another resize, padding or channel
order) would not match what the deployed model sees, so this reuses `d3n.runtime.preprocess`
(ultralytics' letterbox: fit, centre, pad 114, BGR -> RGB, CHW, /255).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

from d3n.data.layout import DatasetLayout
from d3n.errors import DataError

PAD_VALUE = 114


def letterbox(img_bgr: np.ndarray, imgsz: tuple[int, int], pad_value: int = PAD_VALUE) -> np.ndarray:
    """BGR HxWx3 uint8 -> (3, h, w) float32 RGB in [0, 1], through the runtime's own letterbox."""
    from d3n.runtime.preprocess import letterbox as runtime_letterbox
    from d3n.runtime.preprocess import to_blob

    img, _ = runtime_letterbox(img_bgr, imgsz, pad_value)
    return to_blob(img)[0]


def read_image(path: Path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise DataError(f"{path}: cannot be read as an image")
    return img


def dataset_images(data: str | Path, split: str, limit: int | None) -> list[Path]:
    """Up to `limit` images of a split, spread evenly over the (sorted) split."""
    paths = DatasetLayout.open(data).images(split)
    if not paths:
        raise DataError(f"{data}: split '{split}' has no images")
    if limit is None or limit >= len(paths):
        return paths
    idx = np.linspace(0, len(paths) - 1, limit).round().astype(int)
    return [paths[i] for i in idx]


def synthetic_images(n: int, seed: int = 0, size: int = 256) -> list[np.ndarray]:
    """Textured BGR frames with bright blobs: a stand-in when no dataset is given."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        img = cv2.GaussianBlur(rng.integers(60, 190, (size, size, 3), dtype=np.uint8), (7, 7), 0)
        for _ in range(int(rng.integers(1, 4))):
            c = tuple(int(v) for v in rng.integers(0, size, 2))
            cv2.circle(img, c, int(rng.integers(6, size // 5)), tuple(int(v) for v in rng.integers(0, 255, 3)), -1)
        out.append(img)
    return out


def load_frames(data: str | Path | None, n: int, split: str = "train", seed: int = 0) -> list[np.ndarray]:
    """`n` BGR frames from DATA's split, or synthetic ones when DATA is None."""
    if data is None:
        return synthetic_images(n, seed)
    return [read_image(p) for p in dataset_images(data, split, n)]


def batches(frames: list[np.ndarray], imgsz: tuple[int, int]) -> Iterator[np.ndarray]:
    """One (1, 3, h, w) letterboxed input per frame."""
    for f in frames:
        yield letterbox(f, imgsz)[None]
