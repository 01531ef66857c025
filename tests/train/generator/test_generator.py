"""The class-conditional defect generator: it draws the class it is asked for."""

from __future__ import annotations

import pytest
import torch

from d3n.artifacts import read_json
from d3n.errors import ConfigError
from d3n.train.generator.model import Generator

pytestmark = pytest.mark.slow  # trains a small generator (about a minute on 2 CPU cores)


def test_conditioning_draws_the_asked_class(generator_run):
    """Samples from noise for 'bright' have a bright centre, for 'dark' a dark one (the crops are
    centred on the disks), each well above chance."""
    g = Generator.load(generator_run)
    centre = {}
    for cls in (0, 1):
        out = g.sdedit(torch.zeros(8, 3, 16, 16), torch.full((8,), cls), 1.0, 3.0, 20, torch.Generator().manual_seed(1))
        centre[cls] = out[:, :, 5:11, 5:11].mean((1, 2, 3))
    assert (centre[0] > 0).sum() >= 7 and (centre[1] < 0).sum() >= 7, centre


def test_same_seed_same_samples_and_metrics_recorded(generator_run):
    g = Generator.load(generator_run)
    a, b = (g.sdedit(torch.zeros(2, 3, 16, 16), torch.tensor([0, 1]), 1.0, 3.0, 5, torch.Generator().manual_seed(7))
            for _ in range(2))
    assert torch.equal(a, b)
    m = read_json(generator_run / "metrics.json")
    assert m["crops_per_class"] == {"bright": 12, "dark": 12} and m["unseen_classes"] == []


def test_a_class_it_never_saw_is_refused(generator_run):
    g = Generator.load(generator_run)
    g.config["crops_per_class"]["dark"] = 0
    with pytest.raises(ConfigError, match="'dark' had no example"):
        g.class_index("dark")
    with pytest.raises(ConfigError, match="unknown class 'rust'"):
        g.class_index("rust")
