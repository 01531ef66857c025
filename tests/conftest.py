"""Shared fixtures: synthetic datasets made once per session, the NEU-DET location."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Keep ultralytics' settings/fonts out of the user's home during tests.
os.environ.setdefault("D3N_HOME", str(Path(__file__).resolve().parent.parent / ".pytest_cache" / "d3n-home"))

NEU_DET = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "NEU-DET"


@pytest.fixture(scope="session")
def neu_det() -> Path:
    if not (NEU_DET / "IMAGES").is_dir():
        pytest.skip(f"NEU-DET not found at {NEU_DET} (CI has ../shared beside the checkout; a plain clone does not)")
    return NEU_DET


@pytest.fixture(scope="session")
def synth_small(tmp_path_factory) -> Path:
    """24 synthetic defect images at 128 px (train/val split), shared by the fast tests."""
    from d3n.data.synth import generate

    return generate(tmp_path_factory.mktemp("synth_small") / "data", images=24, size=128, seed=0)


MICRO = {
    "data": {"synth": {"images": 20, "size": 96, "seed": 0, "test_frac": 0.2}},
    "ddpm": {"preset": "tiny", "size": 16, "steps": 3, "batch": 4},
    "compress": {"method": "resvae", "steps": 3, "batch": 16},
    "train": {"imgsz": 96, "epochs": 1, "batch": 8, "workers": 0},
    "export": {"formats": ["onnx"]},
}


@pytest.fixture(scope="session")
def micro_pipeline(tmp_path_factory):
    """The full chain (with a test split) once per session; later tests read its run folders."""
    import yaml

    from d3n.cli import main

    root = tmp_path_factory.mktemp("pipeline")
    cfg = root / "micro.yaml"
    cfg.write_text(yaml.safe_dump({**MICRO, "out": str(root / "run")}))
    assert main(["pipeline", str(cfg)]) == 0
    return cfg, root / "run"


@pytest.fixture(scope="session")
def micro_config() -> dict:
    """The micro chain's pipeline config (what `micro_pipeline` ran), for tests that run it another way."""
    import copy

    return copy.deepcopy(MICRO)


# --- the defect generator's tests (tests/train/generator, tests/train/augment): a two-class dataset whose
# classes a pixel statistic tells apart, and a small generator trained on it

TWO_CLASS_NAMES = ("bright", "dark")
TWO_CLASS_SIZE = 64


def make_two_class(root: Path, n: int = 24, clean: int = 4, seed: int = 0) -> Path:
    """Grey noisy plates; a 'bright' defect is a white disk, a 'dark' one a black disk; `clean`
    defect-free train images. One defect per image; val and test get two images each."""
    import cv2
    import numpy as np

    from d3n.data.layout import write_data_yaml

    SIZE = TWO_CLASS_SIZE
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
    write_data_yaml(root, list(TWO_CLASS_NAMES), test=True)
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
