"""PCA compressor: exact on low-rank features, streaming moments, the frozen 1x1 mapping."""

import numpy as np
import pytest
import torch

from d3n.train.repository.compress import load_decoder, load_encoder, reconstruction_metrics
from d3n.train.repository.fit import CompressorTrainConfig, latent_sizes, train_compressor
from d3n.train.repository.pca import ChannelMoments, PCADecoder, PCAEncoder, fit_pca
from d3n.train.repository.store import FeatureStore, StoreWriter


def _low_rank(rng, n, ch, rank, hw=6, seed=0):
    fixed = np.random.default_rng(seed)  # the same basis and mean for every call with this seed
    basis, mean = fixed.normal(size=(ch, rank)), fixed.normal(size=(1, ch, 1, 1)) * 3
    z = rng.normal(size=(n, rank, hw, hw))
    return np.einsum("cr,nrhw->nchw", basis, z) + mean


def test_moments_match_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 3, 4, 7, 7))
    mom = ChannelMoments(4)
    mom.update(x[:2])
    mom.update(x[2:])
    flat = np.moveaxis(x, 2, -1).reshape(-1, 4)
    assert np.allclose(mom.mean(), flat.mean(0))
    assert np.allclose(mom.covariance(), np.cov(flat.T, bias=True))


def test_pca_is_exact_on_low_rank_features():
    rng = np.random.default_rng(1)
    x = _low_rank(rng, 20, 16, 2)
    p = fit_pca([x[:10], x[10:]], 16, 2)
    comps = torch.from_numpy(p["components"])
    assert torch.allclose(comps @ comps.T, torch.eye(2), atol=1e-5)
    enc, dec = PCAEncoder(torch.from_numpy(p["mean"]), comps), PCADecoder(torch.from_numpy(p["mean"]), comps)
    xt = torch.from_numpy(x).float()
    z = enc(xt)
    assert z.shape == (20, 2, 6, 6)
    assert torch.allclose(dec(z), xt, atol=1e-3)
    assert float(p["explained"].sum() / p["total"]) > 0.9999


def _store(tmp_path, rank=3):
    rng = np.random.default_rng(2)
    shapes = {"p3": (16, 8, 8), "p4": (32, 4, 4), "p5": (64, 2, 2)}
    ids = [f"img{i:02d}" for i in range(12)]
    w = StoreWriter(tmp_path / "raw", kind="raw", levels=list(shapes), timesteps=[100, 150], image_ids=ids,
                    shapes=shapes, shard_size=5, meta={"split": "train"})
    for k in w.pending():
        _, count = w.ranges[k]
        w.write_shard(k, {lv: _low_rank(rng, count * 2, s[0], rank, s[1]).reshape(count, 2, *s)
                          for lv, s in shapes.items()})
    w.finish()
    return FeatureStore.open(tmp_path / "raw")


def test_pca_run_gives_frozen_linear_mapping(tmp_path):
    store = _store(tmp_path, rank=2)
    metrics = train_compressor(CompressorTrainConfig(repo=str(store.root), method="pca"), tmp_path / "pca",
                               progress=False)
    assert metrics["latent_channels"] == latent_sizes(store, None) == {"p3": 2, "p4": 4, "p5": 8}
    dec, enc = load_decoder(tmp_path / "pca"), load_encoder(tmp_path / "pca")
    for lv in store.levels:
        assert not dec[lv].training and not any(p.requires_grad for p in dec[lv].parameters())
        _, ch, h, w = store.shape(lv)
        assert dec[lv](enc[lv](torch.zeros(3, ch, h, w))).shape == (3, ch, h, w)
        assert metrics["levels"][lv]["held_out"]["cosine"] > 0.999  # rank 2 <= latent channels
    fid = reconstruction_metrics(store, {lv: (enc[lv], dec[lv]) for lv in store.levels})
    assert all(f["rel_mse"] < 1e-3 for f in fid.values())


def test_latent_channels_option(tmp_path):
    store = _store(tmp_path)
    assert latent_sizes(store, 16) == {"p3": 4, "p4": 8, "p5": 16}
    from d3n.errors import ConfigError

    with pytest.raises(ConfigError, match="latent-channels"):
        latent_sizes(store, 65)
