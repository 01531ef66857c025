"""Feature repository: level sizes, deterministic builds, resume after a kill, corrupt shards."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from d3n.data.synth import generate
from d3n.errors import ArtifactError
from d3n.train.ddpm import features
from d3n.train.ddpm.model import build_scheduler, build_unet, unet_config
from d3n.train.ddpm.train import DDPMTrainConfig, train_ddpm
from d3n.train.repository.build import RepoBuildConfig, build_repo, parse_timesteps
from d3n.train.repository.store import FeatureStore

torch.set_num_threads(1)  # tiny models: threads only contend on a shared CPU


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("repo")
    data = generate(root / "data", images=14, size=48, val_frac=0.3, progress=False)
    ddpm = root / "ddpm"
    train_ddpm(DDPMTrainConfig(data=str(data), size=16, steps=1, batch=4), ddpm, progress=False)
    return data, ddpm


def _cfg(setup, **kw) -> RepoBuildConfig:
    data, ddpm = setup
    return RepoBuildConfig(**{"ddpm": str(ddpm), "data": str(data), "timesteps": [100, 250],
                              "shard_size": 3, "batch": 2, **kw})


@pytest.mark.parametrize("size", [32, 64])
def test_levels_match_p3_p4_p5_strides(size):
    unet = build_unet(unet_config("tiny", size)).eval()
    ext = features.DecoderFeatures(unet, build_scheduler(), size)
    assert ext.shapes() == {"p3": (32, size, size), "p4": (64, size // 2, size // 2),
                            "p5": (128, size // 4, size // 4)}
    assert ext.hooks == {"p3": "up_blocks.3:output", "p4": "up_blocks.2.upsamplers.0:input",
                         "p5": "up_blocks.1.upsamplers.0:input"}
    feats = ext(torch.zeros(2, 3, size, size), ["a", "b"], [100, 150, 250])
    assert feats["p4"].shape == (2, 3, 64, size // 2, size // 2)


def test_paper_preset_levels_reach_512_channels():
    unet = build_unet(unet_config("paper", 32)).eval()
    ext = features.DecoderFeatures(unet, build_scheduler(), 32)
    assert ext.shapes() == {"p3": (128, 32, 32), "p4": (256, 16, 16), "p5": (512, 8, 8)}


def test_noise_is_seeded_per_image_and_timestep():
    a = features.seeded_noise(["x", "y"], 100, (3, 4, 4))
    b = features.seeded_noise(["y"], 100, (3, 4, 4))
    assert torch.equal(a[1], b[0])  # independent of batch company
    assert not torch.equal(a[0], features.seeded_noise(["x"], 150, (3, 4, 4))[0])


def test_build_contract_and_determinism(setup, tmp_path):
    metrics = build_repo(_cfg(setup), tmp_path / "a", progress=False)
    build_repo(_cfg(setup), tmp_path / "b", progress=False)
    a, b = FeatureStore.open(tmp_path / "a"), FeatureStore.open(tmp_path / "b")
    assert a.kind == "raw" and a.levels == ["p3", "p4", "p5"] and a.timesteps == [100, 250]
    assert a.image_ids == sorted(a.image_ids) and len(a) == metrics["images"]
    assert a.shape("p3") == (2, 32, 16, 16) and a.shape("p5") == (2, 128, 4, 4)
    assert a.meta["split"] == "train" and a.meta["ddpm_size"] == 16
    assert a.meta["hooks"]["p4"] == "up_blocks.2.upsamplers.0:input"
    for iid in a.image_ids:
        fa, fb = a.get(iid), b.get(iid)
        for lv in a.levels:
            assert fa[lv].dtype == np.float16 and isinstance(fa[lv].base, np.memmap | np.ndarray)
            assert np.array_equal(fa[lv], fb[lv])
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["levels"] == a.meta["hooks"]


def test_val_split_builds_from_same_ddpm(setup, tmp_path):
    build_repo(_cfg(setup, split="val"), tmp_path / "val", progress=False)
    val = FeatureStore.open(tmp_path / "val")
    assert val.meta["split"] == "val" and len(val) > 0


def test_resume_after_kill_skips_finished_shards(setup, tmp_path, monkeypatch):
    full = tmp_path / "full"
    build_repo(_cfg(setup), full, progress=False)
    real = features.DecoderFeatures.__call__
    calls = {"n": 0, "die_at": 5}

    def counting(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == calls["die_at"]:
            raise KeyboardInterrupt  # killed inside shard 2 (2 calls per shard of 3 images)
        return real(self, *a, **kw)

    monkeypatch.setattr(features.DecoderFeatures, "__call__", counting)
    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        build_repo(_cfg(setup), out, progress=False)
    with pytest.raises(ArtifactError, match="did not finish"):
        FeatureStore.open(out)
    done = sorted((out / "shards").glob("*.npy"))
    assert len(done) == 2 * 3  # shards 0 and 1, three levels each
    mtimes = {p: os.stat(p).st_mtime_ns for p in done}

    calls.update(n=0, die_at=-1)
    metrics = build_repo(_cfg(setup), out, progress=False)
    n_shards = metrics["shards"]
    assert metrics["shards_built_this_run"] == n_shards - 2
    rest = [min(3, metrics["images"] - s) for s in range(6, metrics["images"], 3)]
    assert calls["n"] == sum((c + 1) // 2 for c in rest)  # only the unfinished shards' batches
    assert {p: os.stat(p).st_mtime_ns for p in done} == mtimes
    a, b = FeatureStore.open(full), FeatureStore.open(out)
    for iid in a.image_ids:
        for lv in a.levels:
            assert np.array_equal(a.get(iid)[lv], b.get(iid)[lv])


def test_corrupt_shard_is_reported(setup, tmp_path):
    out = tmp_path / "r"
    build_repo(_cfg(setup), out, progress=False)
    shard = out / "shards" / "p4_00001.npy"
    raw = bytearray(shard.read_bytes())
    raw[-10] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match=r"p4_00001\.npy: corrupt shard \(sha256"):
        FeatureStore.open(out)
    shard.write_bytes(bytes(raw[:200]))  # truncated: caught even without hashing
    with pytest.raises(ArtifactError, match=r"p4_00001\.npy: corrupt shard"):
        FeatureStore.open(out, verify=False)


def test_store_reads_after_pickling_into_a_worker(setup, tmp_path):
    import pickle

    build_repo(_cfg(setup), tmp_path / "r", progress=False)
    store = FeatureStore.open(tmp_path / "r")
    first = store.get(store.image_ids[-1])["p5"].copy()
    clone = pickle.loads(pickle.dumps(store))
    assert clone._maps == {} and np.array_equal(clone.get(store.image_ids[-1])["p5"], first)
    with pytest.raises(ArtifactError, match="not in this repository"):
        store.get("no-such-image")


def test_timesteps_option_is_validated():
    from d3n.errors import ConfigError

    assert parse_timesteps("100,150,250") == [100, 150, 250]
    with pytest.raises(ConfigError, match="--timesteps"):
        parse_timesteps("100,abc")
    with pytest.raises(ConfigError, match="--timesteps"):
        parse_timesteps("1000")


def test_cli_repo_build(setup, tmp_path):
    from d3n.cli import main

    data, ddpm = setup
    rc = main(["repo", "build", "--ddpm", str(ddpm), "--data", str(data), "--out", str(tmp_path / "r"),
               "--timesteps", "100", "--split", "val"])
    assert rc == 0 and FeatureStore.open(tmp_path / "r").timesteps == [100]
    assert main(["repo", "build", "--ddpm", str(tmp_path / "none"), "--data", str(data),
                 "--out", str(tmp_path / "x")]) == 1


NO_GPU = not torch.cuda.is_available()


def test_device_is_not_part_of_the_repository_identity(setup, tmp_path):
    out = tmp_path / "r"
    assert build_repo(_cfg(setup), out, progress=False)["device"] == "cpu"
    index = (out / "store.json").read_text()
    assert "device" not in FeatureStore.open(out).meta
    stamp = (out / "manifest.json").stat().st_mtime_ns
    build_repo(_cfg(setup, device="auto"), out, progress=False)  # complete: nothing rebuilt
    assert (out / "manifest.json").stat().st_mtime_ns == stamp
    (out / "manifest.json").unlink()  # unfinished: another device resumes the same plan, no shard redone
    metrics = build_repo(_cfg(setup, device="auto"), out, progress=False)
    assert metrics["shards_built_this_run"] == 0 and (out / "store.json").read_text() == index


@pytest.mark.skipif(not NO_GPU, reason="a CUDA device is available here")
def test_unavailable_cuda_is_a_clear_error(setup, tmp_path, capsys):
    from d3n.cli import main
    from d3n.errors import D3NError

    with pytest.raises(D3NError, match="device 'cuda' is not available"):
        build_repo(_cfg(setup, device="cuda"), tmp_path / "r", progress=False)
    data, ddpm = setup
    assert main(["repo", "build", "--ddpm", str(ddpm), "--data", str(data), "--out", str(tmp_path / "c"),
                 "--device", "cuda:0"]) == 1
    err = capsys.readouterr().err
    assert "device 'cuda:0' is not available" in err and "Traceback" not in err


def test_cli_repo_build_device_auto(setup, tmp_path):
    from d3n.cli import main

    data, ddpm = setup
    assert main(["repo", "build", "--ddpm", str(ddpm), "--data", str(data), "--out", str(tmp_path / "r"),
                 "--timesteps", "100", "--split", "val", "--device", "auto"]) == 0
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["device"] == ("cpu" if NO_GPU else "cuda")


@pytest.mark.gpu
@pytest.mark.skipif(NO_GPU, reason="needs a CUDA device")
def test_ddpm_train_and_repo_build_on_cuda(setup, tmp_path):
    from d3n.train.ddpm.model import DDPM

    data, _ = setup
    run = tmp_path / "ddpm"
    m = train_ddpm(DDPMTrainConfig(data=str(data), size=16, steps=2, batch=4, ckpt_every=1, device="cuda"), run,
                   progress=False)
    assert m["steps"] == 2 and m["device"].startswith("cuda")
    for name in ("checkpoint.pt", "ddpm.pt"):  # saved from CPU tensors: loads without a GPU
        blob = torch.load(run / name, weights_only=True)
        blob = blob.get("state", blob)  # checkpoint.pt: the trainer's state inside the training-state file
        blob = {**blob, "ema": blob.get("ema", {}).get("weights", {})}
        tensors = [v for part in ("model", "ema", "state_dict") for v in blob.get(part, {}).values()]
        tensors += [v for st in blob.get("opt", {}).get("state", {}).values() for v in st.values()]
        assert tensors and all(t.device.type == "cpu" for t in tensors), name
    assert next(DDPM.load(run).unet.parameters()).device.type == "cpu"

    gpu = build_repo(_cfg(setup, ddpm=str(run), device="cuda"), tmp_path / "gpu", progress=False)
    assert gpu["device"].startswith("cuda")
    build_repo(_cfg(setup, ddpm=str(run)), tmp_path / "cpu", progress=False)
    a, b = FeatureStore.open(tmp_path / "gpu"), FeatureStore.open(tmp_path / "cpu")
    assert a.meta == b.meta  # the same artifact: seeded CPU noise, same model, device not recorded
    for iid in a.image_ids:
        for lv in a.levels:
            x, y = a.get(iid)[lv].astype(np.float32), b.get(iid)[lv].astype(np.float32)
            assert np.abs(x - y).max() <= 2e-2 * max(np.abs(y).max(), 1.0), (iid, lv)  # TF32/fp16 rounding
