"""`d3n repo probe`: a linear probe's accuracy per level, with the pixel control and chance level."""

from __future__ import annotations

import json

import numpy as np

from d3n.cli import main
from d3n.train.repository.probe import ridge_accuracy


def test_ridge_probe_separates_separable_classes_and_not_noise():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    x = rng.normal(size=(300, 8))
    x[np.arange(300), y] += 4.0  # class c lifts feature c
    assert ridge_accuracy(x[:200], y[:200], x[200:], y[200:], 3) > 0.95
    noise = rng.normal(size=(300, 8))
    assert ridge_accuracy(noise[:200], y[:200], noise[200:], y[200:], 3) < 0.6


def test_probe_command_on_a_real_repository(micro_pipeline, tmp_path):
    _, out = micro_pipeline
    assert main(["repo", "probe", "--repo", str(out / "repo" / "train"), "--eval-repo", str(out / "repo" / "val"),
                 "--data", str(out / "data" / "dataset"), "--json", str(tmp_path / "p.json")]) == 0
    r = json.loads((tmp_path / "p.json").read_text())
    assert set(r["levels"]) == {"p3", "p4", "p5"} and 0 <= r["chance"] <= 1
    for lv in r["levels"].values():
        assert 0 <= lv["all_timesteps"] <= 1 and set(lv["per_timestep"]) == {"100", "150", "250"}
    assert r["pixels"]["size"] == 16 and 0 <= r["pixels"]["accuracy"] <= 1


def test_probe_decodes_a_compressed_repository_first(micro_pipeline, tmp_path):
    """The teacher sees decoded features, so the probe scores those, not the latents."""
    _, out = micro_pipeline
    assert main(["repo", "probe", "--repo", str(out / "compress" / "train"), "--eval-repo",
                 str(out / "compress" / "val"), "--data", str(out / "data" / "dataset"),
                 "--json", str(tmp_path / "p.json")]) == 0
    r = json.loads((tmp_path / "p.json").read_text())
    assert r["kind"] == "resvae" and r["decoded"] is True
