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
