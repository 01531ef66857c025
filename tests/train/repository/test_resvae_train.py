"""ResVAE compressor: training lowers the round-trip error, latents match PCA's, compressed repos."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from d3n.errors import ArtifactError, ConfigError
from d3n.train.repository.compress import compress_repo, compress_run, load_decoder, load_encoder
from d3n.train.repository.fit import CompressorTrainConfig, train_compressor
from d3n.train.repository.resvae import ResVAE
from d3n.train.repository.store import FeatureStore, StoreWriter

torch.set_num_threads(1)  # tiny models: threads only contend on a shared CPU
SHAPES = {"p3": (16, 8, 8), "p4": (32, 4, 4), "p5": (64, 2, 2)}


def _features(rng, n, shape, seed):
    """Smooth, nonlinear maps from 3 hidden factors: not exactly linear low-rank."""
    ch, h, w = shape
    fixed = np.random.default_rng(seed)
    basis, mean = fixed.normal(size=(ch, 6)), fixed.normal(size=(1, ch, 1, 1))
    z = rng.normal(size=(n, 3, h, w))
    hidden = np.concatenate([np.tanh(2 * z), z ** 2 - 1], axis=1)
    return np.einsum("ck,nkhw->nchw", basis, hidden) + mean + 0.05 * rng.normal(size=(n, ch, h, w))


def _repo(path: Path, split: str, n: int, seed: int) -> FeatureStore:
    rng = np.random.default_rng(seed)
    ids = [f"{split}{i:03d}" for i in range(n)]
    w = StoreWriter(path, kind="raw", levels=list(SHAPES), timesteps=[100, 150, 250], image_ids=ids,
                    shapes=SHAPES, shard_size=8, meta={"split": split})
    for k in w.pending():
        _, count = w.ranges[k]
        w.write_shard(k, {lv: _features(rng, count * 3, s, i).reshape(count, 3, *s)
                          for i, (lv, s) in enumerate(SHAPES.items())})
    w.finish()
    return FeatureStore.open(path)


@pytest.fixture(scope="module")
def repos(tmp_path_factory) -> dict[str, FeatureStore]:
    root = tmp_path_factory.mktemp("vae")
    return {"train": _repo(root / "train", "train", 20, 0), "val": _repo(root / "val", "val", 6, 1)}


def test_round_trip_error_drops_with_training(repos, tmp_path):
    def held_out(steps):
        cfg = CompressorTrainConfig(repo=str(repos["train"].root), steps=steps, batch=16, pca_init=False,
                                    holdout=0.2, lr=3e-3)
        m = train_compressor(cfg, tmp_path / f"s{steps}", progress=False)
        return {lv: m["levels"][lv]["held_out"]["rel_mse"] for lv in SHAPES}, m

    before, _ = held_out(1)
    after, m = held_out(60)
    for lv in SHAPES:
        assert after[lv] < 0.7 * before[lv], (lv, before[lv], after[lv])
        assert m["levels"][lv]["mse_last"] < m["levels"][lv]["mse_first"]


def test_pca_init_starts_at_pca(repos):
    store = repos["train"]
    from d3n.train.repository.fit import _fit_pca

    pca = _fit_pca(store, "p4", list(range(len(store))), 4)
    vae = ResVAE(32, 4)
    vae.set_normalisation(torch.from_numpy(pca["mean"]), 2.0)
    vae.init_linear(torch.from_numpy(pca["components"]))
    x = torch.from_numpy(np.asarray(store.get_index(0)["p4"], np.float32))
    c = torch.from_numpy(pca["components"])
    mean = torch.from_numpy(pca["mean"]).view(1, -1, 1, 1)
    pca_rec = torch.einsum("kc,nkhw->nchw", c, torch.einsum("kc,nchw->nkhw", c, x - mean)) + mean
    assert torch.allclose(vae.decode(vae.encode(x)[0]), pca_rec, atol=1e-4)


def test_resvae_and_pca_give_same_latent_shapes(repos, tmp_path):
    train = repos["train"]
    for method in ("resvae", "pca"):
        cfg = CompressorTrainConfig(repo=str(train.root), method=method, steps=2, batch=8)
        train_compressor(cfg, tmp_path / method, progress=False)
        compress_repo(train.root, tmp_path / method, tmp_path / f"c_{method}", progress=False)
    a, b = FeatureStore.open(tmp_path / "c_resvae"), FeatureStore.open(tmp_path / "c_pca")
    assert a.kind == "resvae" and b.kind == "pca"
    for lv in train.levels:
        t, ch, h, w = train.shape(lv)
        assert a.shape(lv) == b.shape(lv) == (t, ch // 8, h, w)
        z = torch.from_numpy(a.get(a.image_ids[0])[lv].astype(np.float32))
        for run in ("resvae", "pca"):
            dec = load_decoder(tmp_path / run)[lv]
            assert not dec.training and not any(p.requires_grad for p in dec.parameters())
            assert dec(z).shape == (t, ch, h, w)
    assert a.nbytes() * 8 == train.nbytes()
    assert a.meta["compressor"] == str((tmp_path / "resvae").resolve()) and a.meta["split"] == "train"
    z0 = load_encoder(tmp_path / "resvae")["p3"](torch.from_numpy(train.get_index(0)["p3"].astype(np.float32)))
    assert np.allclose(a.get_index(0)["p3"], z0.numpy().astype(np.float16))


def test_val_repo_compressed_with_train_compressor_but_never_fitted(repos, tmp_path):
    cfg = CompressorTrainConfig(repo=str(repos["train"].root), method="pca")
    train_compressor(cfg, tmp_path / "pca", progress=False)
    m = compress_run(repos["val"].root, tmp_path / "pca", tmp_path / "val_c", progress=False)
    assert m["ratio"] == 0.125 and FeatureStore.open(tmp_path / "val_c").meta["split"] == "val"
    assert (tmp_path / "val_c" / "manifest.json").exists()
    with pytest.raises(ConfigError, match="train split only"):
        train_compressor(CompressorTrainConfig(repo=str(repos["val"].root)), tmp_path / "bad", progress=False)
    with pytest.raises(ArtifactError, match="'pca' compressor, not 'resvae'"):
        compress_run(repos["val"].root, tmp_path / "pca", tmp_path / "x", method="resvae", progress=False)
    with pytest.raises(ArtifactError, match="compress a raw one"):
        compress_repo(tmp_path / "val_c", tmp_path / "pca", tmp_path / "y", progress=False)


def test_cli_resvae_train_and_repo_compress(repos, tmp_path):
    from d3n.cli import main

    train = str(repos["train"].root)
    assert main(["resvae", "train", "--repo", train, "--out", str(tmp_path / "v"), "--steps", "2",
                 "--batch", "8", "--latent-channels", "16"]) == 0
    assert main(["repo", "compress", "--repo", train, "--resvae", str(tmp_path / "v"),
                 "--out", str(tmp_path / "c")]) == 0
    assert FeatureStore.open(tmp_path / "c").shape("p5") == (3, 16, 2, 2)
    assert main(["repo", "compress", "--repo", train, "--resvae", str(tmp_path / "missing"),
                 "--out", str(tmp_path / "d")]) == 1


NO_GPU = not torch.cuda.is_available()


def test_cli_device_auto_and_device_left_out_of_identity(repos, tmp_path):
    from d3n.cli import main

    train, auto = str(repos["train"].root), "cpu" if NO_GPU else "cuda"
    assert main(["resvae", "train", "--repo", train, "--out", str(tmp_path / "v"), "--steps", "2",
                 "--batch", "8", "--device", "auto"]) == 0
    assert json.loads((tmp_path / "v" / "metrics.json").read_text())["device"] == auto
    assert main(["repo", "compress", "--repo", train, "--resvae", str(tmp_path / "v"),
                 "--out", str(tmp_path / "c"), "--device", "auto"]) == 0
    assert json.loads((tmp_path / "c" / "metrics.json").read_text())["device"] == auto
    assert "device" not in FeatureStore.open(tmp_path / "c").meta
    stamps = {d: (tmp_path / d / "manifest.json").stat().st_mtime_ns for d in ("v", "c")}
    cfg = CompressorTrainConfig(repo=train, steps=2, batch=8, device="cpu")
    train_compressor(cfg, tmp_path / "v", progress=False)  # complete: another device does not redo it
    compress_run(train, tmp_path / "v", tmp_path / "c", progress=False, device="cpu")
    assert stamps == {d: (tmp_path / d / "manifest.json").stat().st_mtime_ns for d in ("v", "c")}


@pytest.mark.skipif(not NO_GPU, reason="a CUDA device is available here")
def test_unavailable_cuda_is_a_clear_error(repos, tmp_path, capsys):
    from d3n.cli import main
    from d3n.errors import D3NError

    train = str(repos["train"].root)
    with pytest.raises(D3NError, match="device 'cuda' is not available"):
        train_compressor(CompressorTrainConfig(repo=train, method="pca", device="cuda"), tmp_path / "v",
                         progress=False)
    train_compressor(CompressorTrainConfig(repo=train, method="pca"), tmp_path / "pca", progress=False)
    with pytest.raises(D3NError, match="device 'cuda:0' is not available"):
        compress_run(train, tmp_path / "pca", tmp_path / "c", progress=False, device="cuda:0")
    with pytest.raises(ConfigError, match="expected cpu, cuda"):
        compress_run(train, tmp_path / "pca", tmp_path / "c", progress=False, device="gpu")
    assert main(["repo", "compress", "--repo", train, "--resvae", str(tmp_path / "pca"),
                 "--out", str(tmp_path / "d"), "--device", "cuda"]) == 1
    assert main(["resvae", "train", "--repo", train, "--out", str(tmp_path / "e"), "--device", "cuda"]) == 1
    err = capsys.readouterr().err
    assert err.count("device 'cuda' is not available") == 2 and "Traceback" not in err


@pytest.mark.gpu
@pytest.mark.skipif(NO_GPU, reason="needs a CUDA device")
def test_resvae_train_and_compress_on_cuda(repos, tmp_path):
    train = repos["train"]
    m = train_compressor(CompressorTrainConfig(repo=str(train.root), steps=2, batch=8, device="cuda"),
                         tmp_path / "v", progress=False)
    assert m["device"].startswith("cuda")
    blob = torch.load(tmp_path / "v" / "compressor.pt", weights_only=True)  # saved from CPU tensors
    assert all(t.device.type == "cpu" for e in blob["levels"].values() for t in e["state"].values())
    compress_run(train.root, tmp_path / "v", tmp_path / "gpu", progress=False, device="cuda")
    compress_run(train.root, tmp_path / "v", tmp_path / "cpu", progress=False)
    a, b = FeatureStore.open(tmp_path / "gpu"), FeatureStore.open(tmp_path / "cpu")
    for lv in train.levels:
        x, y = a.get_index(0)[lv].astype(np.float32), b.get_index(0)[lv].astype(np.float32)
        assert np.abs(x - y).max() <= 2e-2 * max(np.abs(y).max(), 1.0), lv  # TF32/fp16 rounding
