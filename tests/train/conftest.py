"""A two-class dataset whose classes a pixel statistic tells apart, and a generator trained on it."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from d3n.data.layout import write_data_yaml

NAMES = ("bright", "dark")
SIZE = 64


def make_two_class(root: Path, n: int = 24, clean: int = 4, seed: int = 0) -> Path:
    """Grey noisy plates; a 'bright' defect is a white disk, a 'dark' one a black disk; `clean`
    defect-free train images. One defect per image; val and test get two images each."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", n), ("val", 2), ("test", 2)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(count + (clean if split == "train" else 0)):
            img = np.clip(128 + rng.normal(0, 6, (SIZE, SIZE)), 0, 255).astype(np.uint8)
            label = ""
            if i < count:
                cls = i % 2
                r = int(rng.integers(6, 10))
                cx, cy = (int(v) for v in rng.integers(r + 2, SIZE - r - 2, 2))
                cv2.circle(img, (cx, cy), r, 235 if cls == 0 else 20, -1)
                label = f"{cls} {cx / SIZE:.6f} {cy / SIZE:.6f} {(2 * r + 1) / SIZE:.6f} {(2 * r + 1) / SIZE:.6f}\n"
            stem = f"{split}_{i:03d}"
            cv2.imwrite(str(root / "images" / split / f"{stem}.png"), cv2.cvtColor(img, cv2.COLOR_GRAY2BGR))
            (root / "labels" / split / f"{stem}.txt").write_text(label)
    write_data_yaml(root, list(NAMES), test=True)
    return root


@pytest.fixture(scope="session")
def two_class(tmp_path_factory) -> Path:
    return make_two_class(tmp_path_factory.mktemp("two_class") / "data")


@pytest.fixture(scope="session")
def generator_run(two_class, tmp_path_factory) -> Path:
    from d3n.train.generator.train import GeneratorConfig, train_generator

    out = tmp_path_factory.mktemp("generator") / "run"
    train_generator(GeneratorConfig(data=str(two_class), size=16, steps=400, batch=16, lr=2e-3, ema=0.99,
                                    min_side=16, context=1.5, ckpt_every=100), out, progress=False)
    return out
