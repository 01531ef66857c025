"""The train loader's workers see each epoch's dataset state: closing mosaic (and any other
augmentation switch the loop makes between epochs) reaches them."""

from __future__ import annotations

import torch

from d3n.train.detector.loop import TrainConfig, make_loaders

OFF = {"mosaic": 0.0, "scale": 0.0, "translate": 0.0, "fliplr": 0.0, "hsv_h": 0.0, "hsv_s": 0.0, "hsv_v": 0.0}


def _first_batch(loader, seed: int) -> torch.Tensor:
    """A whole epoch, as the loop runs it (same shuffle order each time); its first batch."""
    loader.generator.manual_seed(seed)
    return [b["img"] for b in loader][0]


def test_augmentation_switched_off_between_epochs_reaches_the_workers(synth_small):
    workers, _, _ = make_loaders(TrainConfig(imgsz=64, batch=4, workers=2, seed=0), synth_small)
    plain, _, _ = make_loaders(TrainConfig(imgsz=64, batch=4, workers=0, seed=0, **OFF), synth_small)
    augmented = _first_batch(workers, 0)  # epoch 0 with mosaic and the rest on
    for k, v in OFF.items():  # the loop closes mosaic this way for the last epochs
        setattr(workers.dataset.aug, k, v)
    workers.dataset.set_epoch(1)
    assert torch.equal(_first_batch(workers, 0), _first_batch(plain, 0))
    assert not torch.equal(augmented, _first_batch(plain, 0))


def test_a_loader_fix_retrains_detectors_made_before_it(tmp_path, monkeypatch):
    """The data pipeline's version is in every detector stage's key: runs trained before a fix
    that changes what the same config trains do not pass as up to date."""
    from d3n.stage import stage_key
    from d3n.stages import get
    from d3n.train.detector import baseline, loop

    stage, cfg = get("baseline"), baseline.Config()
    inputs = {"data": tmp_path / "data" / "dataset"}
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "manifest.json").write_text("{}")  # the upstream stage's manifest, fingerprinted
    now = stage_key(stage, cfg, tmp_path, inputs)
    monkeypatch.setattr(loop, "LOADER_VERSION", loop.LOADER_VERSION - 1)
    assert stage_key(stage, cfg, tmp_path, inputs) != now
