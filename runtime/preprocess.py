"""Letterbox preprocessing, identical to ultralytics' `LetterBox` at inference time.

Same scale (min of the two ratios, up-scaling allowed), same rounding of the resized size, same
split of the padding (`round(d/2 - 0.1)` before, `round(d/2 + 0.1)` after), pad value 114,
bilinear resize. Any deviation shifts boxes by a pixel and changes scores, so the runtime's
detections would no longer match what the model was validated with. The geometry (`Letterbox`,
`letterbox_geometry`) lives in `d3n.boxes`, shared with box scaling and evaluation; this module
does the pixel work.
"""

from __future__ import annotations

import cv2
import numpy as np

from d3n.boxes import Letterbox, letterbox_geometry


def letterbox(img: np.ndarray, new_shape: tuple[int, int] | int, pad_value: int = 114
              ) -> tuple[np.ndarray, Letterbox]:
    """Resize `img` (HxWxC uint8) keeping its aspect ratio and pad it to `new_shape` (h, w).

    Returns the padded image and the `Letterbox` mapping needed to scale boxes back.
    """
    lb = letterbox_geometry(img.shape[:2], new_shape)
    new_h, new_w = lb.resized
    if img.shape[:2] != (new_h, new_w):
        img = cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    if img.ndim == 2:
        img = img[..., None]
    img = cv2.copyMakeBorder(img, *lb.padding, cv2.BORDER_CONSTANT, value=(pad_value,) * 3)
    if img.ndim == 2:  # copyMakeBorder drops a singleton channel axis
        img = img[..., None]
    return img, lb


def to_blob(img: np.ndarray, rgb: bool = True, scale: float = 1.0 / 255.0,
            dtype: str = "float32") -> np.ndarray:
    """HxWx3 BGR uint8 -> 1x3xHxW float blob (RGB if `rgb`), multiplied by `scale`."""
    if rgb:
        img = img[..., ::-1]
    blob = np.ascontiguousarray(img.transpose(2, 0, 1)[None], dtype=np.float32)
    blob *= np.float32(scale)
    return blob.astype(dtype, copy=False)


def prepare(frame: np.ndarray, input_shape: tuple[int, int], preprocess=None
            ) -> tuple[np.ndarray, Letterbox]:
    """Frame (BGR uint8) -> model blob and its letterbox mapping.

    `preprocess` is the sidecar's `Preprocess` block (pad value, colour order, scale, dtype);
    None means ultralytics' defaults.
    """
    pad = getattr(preprocess, "pad_value", 114)
    rgb = getattr(preprocess, "color", "rgb") == "rgb"
    scale = getattr(preprocess, "scale", 1.0 / 255.0)
    dtype = getattr(preprocess, "dtype", "float32")
    if preprocess is not None and not preprocess.letterbox:
        # Plain stretch to the input size: gains differ per axis, no padding.
        h, w = frame.shape[:2]
        img = cv2.resize(frame, (input_shape[1], input_shape[0]), interpolation=cv2.INTER_LINEAR)
        info = Letterbox(input_shape[1] / w, input_shape[0] / h, 0, 0, (h, w), tuple(input_shape))
    else:
        img, info = letterbox(frame, input_shape, pad)
    return to_blob(img, rgb=rgb, scale=scale, dtype=dtype), info
