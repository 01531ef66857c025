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
