"""Decoded features kept between epochs: served from memory they equal fresh ones, within a budget."""

from __future__ import annotations

import pytest
import torch

from d3n.train.detector.data import AugmentConfig, DetectionDataset, collate
from d3n.train.teacher.features import CACHE_MB, FeatureProvider


def _batches(data, imgsz=96):
    ds = DetectionDataset(data, "train", imgsz, AugmentConfig(mosaic=1.0), seed=0)  # mosaic: 4 pieces a sample
    return [collate([ds[i] for i in range(j, j + 4)]) for j in (0, 4)], imgsz


@pytest.mark.parametrize("shuffle", [None, 0])
def test_cached_features_equal_fresh_ones(micro_pipeline, monkeypatch, shuffle):
    _, out = micro_pipeline
    repos = [out / "compress" / "train"]
    batches, imgsz = _batches(out / "data" / "dataset")
    monkeypatch.setenv(CACHE_MB, "0")
    fresh = FeatureProvider(repos, shuffle_seed=shuffle)
    monkeypatch.setenv(CACHE_MB, "64")
    cached = FeatureProvider(repos, shuffle_seed=shuffle)
    assert fresh.budget == 0 and cached.budget == 64 * 2 ** 20
    for _ in range(2):  # a second epoch: every image from memory
        for b in batches:
            want, got = fresh(b["pieces"], imgsz), cached(b["pieces"], imgsz)
            for lv in want:
                torch.testing.assert_close(got[lv], want[lv], atol=1e-5, rtol=1e-5)
    assert cached.hits > cached.misses > 0 and len(cached.cache) == cached.misses
    assert fresh.cache == {} and fresh.hits == 0


def test_the_budget_bounds_the_cache(micro_pipeline, monkeypatch):
    _, out = micro_pipeline
    batches, imgsz = _batches(out / "data" / "dataset")
    monkeypatch.setenv(CACHE_MB, "64")
    full = FeatureProvider([out / "compress" / "train"])
    for b in batches:
        full(b["pieces"], imgsz)
    one = max(t.numel() * t.element_size() for t in full.cache.values())
    small = FeatureProvider([out / "compress" / "train"])
    small.budget = 3 * one  # room for about three decoded maps
    for b in batches:
        want, got = full(b["pieces"], imgsz), small(b["pieces"], imgsz)
        for lv in want:
            torch.testing.assert_close(got[lv], want[lv], atol=1e-5, rtol=1e-5)
    assert 0 < small.cache_bytes <= small.budget and len(small.cache) < len(full.cache)


def test_a_bad_budget_is_named(micro_pipeline, monkeypatch):
    from d3n.errors import ArtifactError

    _, out = micro_pipeline
    monkeypatch.setenv(CACHE_MB, "lots")
    with pytest.raises(ArtifactError, match="D3N_FEATURE_CACHE_MB='lots'"):
        FeatureProvider([out / "compress" / "train"])
