"""Synthetic steel-surface defect dataset: the embedded default for the demo and fast tests.

A rolled-steel grey texture (horizontal streaks, low-frequency shading, grain) carries 1-4
defects per image from NEU-DET's six classes (see synth_shapes). Boxes are the tight extent of
the pixels each defect actually changed. Everything derives from the seed: the same seed gives
byte-identical files. Needs only numpy and Pillow.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
from PIL import Image

from d3n.data.layout import write_data_yaml
from d3n.data.splits import test_count
from d3n.data.synth_shapes import CLASSES, DRAWERS
from d3n.errors import DataError

log = logging.getLogger(__name__)

# A pixel counts as drawn when at least this share of the defect's contrast reached it.
DRAWN = 0.2
MAX_OVERLAP = 0.3  # intersection / smaller box: keeps defects from hiding each other
MIN_BOX_PX = 3
PARAMS_FILE = "synth.json"


def _smooth1d(x: np.ndarray, sigma: float) -> np.ndarray:
    r = max(1, int(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    return np.convolve(np.pad(x, r, mode="reflect"), k / k.sum(), mode="valid")


def _upsample(field: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(field.astype(np.float32), "F").resize((size, size), Image.BICUBIC))


def surface(size: int, rng: np.random.Generator) -> np.ndarray:
    """A hot-rolled strip texture (float32 grey levels): rolling direction is horizontal."""
    base = rng.uniform(115, 165)
    rows = _smooth1d(rng.normal(0, 1, size), rng.uniform(1.0, 3.0))  # streaks along x
    rows = rows / (rows.std() + 1e-6) * rng.uniform(3, 7)
    along = 1.0 + 0.5 * _upsample(rng.normal(0, 1, (1, 6)), size)[:1]  # streaks fade along x
    shading = _upsample(rng.normal(0, 1, (4, 4)), size) * rng.uniform(5, 12)
    grain = _upsample(rng.normal(0, 1, (size, max(2, size // 6))), size) * 3.0  # x-stretched
    noise = rng.normal(0, 2.5, (size, size))
    return (base + rows[:, None] * along + shading + grain + noise).astype(np.float32)


def _box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    ys, xs = np.nonzero(mask >= DRAWN)
    if xs.size == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1  # pixel edges


def _overlaps(box: tuple[int, int, int, int], others: list[tuple[int, int, int, int]]) -> bool:
    for o in others:
        iw = min(box[2], o[2]) - max(box[0], o[0])
        ih = min(box[3], o[3]) - max(box[1], o[1])
        if iw > 0 and ih > 0:
            smaller = min((box[2] - box[0]) * (box[3] - box[1]), (o[2] - o[0]) * (o[3] - o[1]))
            if iw * ih > MAX_OVERLAP * smaller:
                return True
    return False


def render(size: int, rng: np.random.Generator, first_class: int,
           rare: tuple[int, float] | None = None) -> tuple[np.ndarray, list[tuple]]:
    """One image (uint8, HxW) and its boxes [(cls, x0, y0, x1, y1)] in pixels.

    The first defect's class is given (cycled by the caller) so every class is covered evenly.
    `rare` = (class, keep): each defect of that class is drawn with probability `keep`, otherwise
    it becomes the next class (a rare class for augmentation studies; no extra draws without it).
    """
    img = surface(size, rng)
    s = size / 256
    classes = [first_class] + [int(c) for c in rng.integers(0, len(CLASSES), int(rng.integers(0, 4)))]
    if rare is not None:
        classes = [(c + 1) % len(CLASSES) if c == rare[0] and rng.random() >= rare[1] else c for c in classes]
    boxes: list[tuple] = []
    margin = 0.12 * size
    for cls in classes:
        for _ in range(25):  # re-place until it neither vanishes nor covers another defect
            cx, cy = rng.uniform(margin, size - margin, 2)
            mask, delta = DRAWERS[CLASSES[cls]](size, float(cx), float(cy), s, rng)
            box = _box(mask)
            if box is None or min(box[2] - box[0], box[3] - box[1]) < MIN_BOX_PX:
                continue
            if _overlaps(box, [b[1:] for b in boxes]):
                continue
            img += mask * delta
            boxes.append((cls, *box))
            break
    if not boxes:
        raise RuntimeError(f"could not place a defect on a {size}px image; use --size >= 32")
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), boxes


def _yolo_lines(boxes: list[tuple], size: int) -> str:
    out = []
    for cls, x0, y0, x1, y1 in boxes:
        out.append(f"{cls} {(x0 + x1) / 2 / size:.6f} {(y0 + y1) / 2 / size:.6f} "
                   f"{(x1 - x0) / size:.6f} {(y1 - y0) / size:.6f}")
    return "\n".join(out) + "\n"


def _jpeg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, "L").save(buf, "JPEG", quality=95)
    return buf.getvalue()


def _split(n: int, val_frac: float, seed: int, test_frac: float = 0.0) -> list[str]:
    """Split name per image: a seeded shuffle, with train and val non-empty when n >= 2; test (when
    test_frac > 0) follows val in the same shuffle, so a dataset without test is unchanged."""
    n_val = int(round(n * val_frac))
    if n >= 2 and val_frac > 0:
        n_val = min(max(n_val, 1), n - 1)
    order = np.random.default_rng([seed, 1]).permutation(n)
    split = ["train"] * n
    for i in order[:n_val]:
        split[i] = "val"
    for i in order[n_val:n_val + test_count(n, n_val, test_frac)]:
        split[i] = "test"
    return split


def _params(images: int, size: int, seed: int, val_frac: float, test_frac: float = 0.0) -> dict:
    params = {"generator": "d3n.data.synth/1", "images": images, "size": size, "seed": seed,
              "val_frac": val_frac, "names": list(CLASSES)}
    if test_frac:  # only then: a dataset made before test existed is still recognised and reused
        params["test_frac"] = test_frac
    return params


def _check_args(images: int, size: int, val_frac: float, test_frac: float) -> None:
    if images < 1:
        raise DataError(f"--images must be >= 1 (got {images})")
    if size < 32:
        raise DataError(f"--size must be >= 32 px (got {size})")
    if not 0 <= val_frac < 1:
        raise DataError(f"--val-frac must be in [0, 1) (got {val_frac})")
    if not 0 <= test_frac < 1 or val_frac + test_frac >= 1:
        raise DataError(f"--test-frac must be in [0, 1) and leave training images (got {test_frac} "
                        f"with --val-frac {val_frac})")


def _existing(out: Path, params: dict, overwrite: bool) -> bool:
    """True if `out` already holds this exact dataset; error if it holds something else."""
    import json

    if not out.exists():
        return False
    pfile = out / PARAMS_FILE
    if not overwrite and pfile.exists() and (out / "data.yaml").exists():
        try:
            if json.loads(pfile.read_text()) == params:
                return True
        except json.JSONDecodeError:
            pass
    if overwrite:
        return False
    if out.is_dir() and not any(out.iterdir()):
        return False
    raise DataError(f"{out}: exists and is not this synthetic dataset; pick another --out or pass --force")


def generate(out: str | Path, images: int = 240, size: int = 256, seed: int = 0, val_frac: float = 0.2,
             overwrite: bool = False, progress: bool = True, test_frac: float = 0.0,
             rare: str | None = None, rare_keep: float = 0.1) -> Path:
    """Render the synthetic dataset into `out` (YOLO layout + data.yaml + preview.png); returns `out`.

    `rare`: in the train split only, that class keeps a `rare_keep` share of its defects (val and
    test keep the full distribution, so its AP stays measurable): the setting of an augmentation study.

    An existing folder holding the same parameters is reused as is (the output is deterministic).
    The dataset is built in a temporary sibling folder and renamed into place, so an interrupted
    run never leaves a folder that looks finished.
    """
    from tqdm import tqdm

    from d3n.artifacts import atomic_dir, write_json
    from d3n.data.preview import save_preview

    out = Path(out)
    _check_args(images, size, val_frac, test_frac)
    if rare is not None and rare not in CLASSES:
        raise DataError(f"--rare {rare}: not a class of the synthetic dataset ({', '.join(CLASSES)})")
    if rare is not None and not 0 <= rare_keep <= 1:
        raise DataError(f"--rare-keep must be in [0, 1] (got {rare_keep})")
    params = _params(images, size, seed, val_frac, test_frac)
    if rare is not None:  # only then: datasets made without it keep their parameters
        params["rare"] = {"class": rare, "keep": rare_keep}
    if _existing(out, params, overwrite):
        log.info("%s: already holds this synthetic dataset, reusing it", out)
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out) as tmp:
        splits = _split(images, val_frac, seed, test_frac)
        for i in tqdm(range(images), desc="synth", unit="img", disable=not progress):
            rng = np.random.default_rng([seed, 0, i])
            split = splits[i]
            cut = (CLASSES.index(rare), rare_keep) if rare is not None and split == "train" else None
            arr, boxes = render(size, rng, first_class=i % len(CLASSES), rare=cut)
            for sub, data in (("images", _jpeg(arr)), ("labels", _yolo_lines(boxes, size).encode())):
                path = tmp / sub / split / f"synth_{i:05d}.{'jpg' if sub == 'images' else 'txt'}"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
        for sub in ("images", "labels"):  # an empty val split still exists as a folder
            for split in ("train", "val", "test") if test_frac else ("train", "val"):
                (tmp / sub / split).mkdir(parents=True, exist_ok=True)
        write_data_yaml(tmp, CLASSES, test=bool(test_frac))
        save_preview(tmp, tmp / "preview.png")
        write_json(tmp / PARAMS_FILE, params)
    log.info("%s: %d synthetic images (%dpx, seed %d)", out, images, size, seed)
    return out
