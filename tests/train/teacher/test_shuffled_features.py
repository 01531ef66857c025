"""The "shuffled" control: every image gets another image's DDPM features, same shapes, same split."""

from __future__ import annotations

import numpy as np
import pytest

from d3n.errors import ArtifactError
from d3n.train.teacher.features import FeatureProvider, derangement


def test_derangement_maps_every_id_to_another_one_reproducibly():
    ids = [f"img{i}" for i in range(50)]
    m = derangement(ids, seed=3)
    assert sorted(m) == sorted(ids) and sorted(m.values()) == sorted(ids)
    assert all(k != v for k, v in m.items())
    assert m == derangement(ids, seed=3) and m != derangement(ids, seed=4)
    with pytest.raises(ArtifactError):
        derangement(["only"], seed=0)


def test_shuffled_features_differ_from_the_true_ones_for_every_image(micro_pipeline):
    _, out = micro_pipeline
    repos = [out / "compress" / s for s in ("train", "val", "test")]
    true = FeatureProvider(repos)
    shuffled = FeatureProvider(repos, shuffle_seed=0)
    for store in true.stores:
        for stem in store.image_ids:
            a, b = true._lookup(stem), shuffled._lookup(stem)
            assert shuffled.swap[stem] in store.image_ids  # another image of the same split
            for lv in a:
                assert a[lv].shape == b[lv].shape
                assert not np.array_equal(a[lv], b[lv]), (stem, lv)
