"""DDPM pre-training: a few steps on synthetic images, and a bit-exact resume after a kill."""

import json
from pathlib import Path

import pytest
import torch

from d3n.data.synth import generate
from d3n.errors import ArtifactError
from d3n.train.ddpm import train as ddpm_train
from d3n.train.ddpm.model import DDPM
from d3n.train.ddpm.train import CHECKPOINT, DDPMTrainConfig, batch_indices, train_ddpm


def _state(path: Path) -> dict:
    """The trainer's state inside the training-state file; it loads with weights_only=True."""
    return torch.load(path, weights_only=True)["state"]

torch.set_num_threads(1)  # tiny models: threads only contend on a shared CPU


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("ddpm") / "data", images=12, size=48, val_frac=0.25, progress=False)


def _cfg(data: Path, **kw) -> DDPMTrainConfig:
    base = {"data": str(data), "size": 16, "steps": 5, "batch": 4, "ckpt_every": 2, "ema": 0.9}
    return DDPMTrainConfig(**{**base, **kw})


def test_trains_and_writes_run_folder(data, tmp_path):
    metrics = train_ddpm(_cfg(data, steps=3), tmp_path / "run", progress=False)
    assert metrics["steps"] == 3 and metrics["images"] == 9
    for name in ("ddpm.pt", "config.yaml", "metrics.json", "manifest.json", CHECKPOINT):
        assert (tmp_path / "run" / name).exists(), name
    ddpm = DDPM.load(tmp_path / "run")
    assert ddpm.size == 16 and not any(p.requires_grad for p in ddpm.unet.parameters())


def test_resume_after_kill_is_bit_exact(data, tmp_path, monkeypatch):
    cfg = _cfg(data)
    train_ddpm(cfg, tmp_path / "full", progress=False)

    real_step = ddpm_train.Trainer.train_step
    calls = {"n": 0}

    def dying_step(self):
        calls["n"] += 1
        if calls["n"] == 4:  # killed during step 4; the last checkpoint is after step 2
            raise KeyboardInterrupt
        return real_step(self)

    monkeypatch.setattr(ddpm_train.Trainer, "train_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train_ddpm(cfg, tmp_path / "killed", progress=False)
    assert _state(tmp_path / "killed" / CHECKPOINT)["step"] == 2
    assert not (tmp_path / "killed" / "manifest.json").exists()
    monkeypatch.setattr(ddpm_train.Trainer, "train_step", real_step)
    train_ddpm(cfg, tmp_path / "killed", progress=False)

    full = _state(tmp_path / "full" / CHECKPOINT)
    resumed = _state(tmp_path / "killed" / CHECKPOINT)
    assert full["step"] == resumed["step"] == 5
    assert full["ema"]["updates"] == resumed["ema"]["updates"] == 5
    for name, a, b in (("model", full["model"], resumed["model"]),
                       ("ema", full["ema"]["weights"], resumed["ema"]["weights"])):
        for k, v in a.items():
            assert torch.equal(v, b[k]), f"{name}.{k} differs after resume"
    for k, st in full["opt"]["state"].items():
        assert torch.equal(st["exp_avg"], resumed["opt"]["state"][k]["exp_avg"])
    assert full["losses"] == resumed["losses"]
    assert full["lrs"]["last_epoch"] == resumed["lrs"]["last_epoch"]


def test_resume_refuses_a_different_config(data, tmp_path):
    train_ddpm(_cfg(data, steps=2), tmp_path / "run", progress=False)
    (tmp_path / "run" / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match=r"checkpoint.pt: .*different config \(lr: 0.0001 -> 0.0003\)"):
        train_ddpm(_cfg(data, steps=2, lr=3e-4), tmp_path / "run", progress=False)


def test_ema_zero_disables_it(data, tmp_path):
    train_ddpm(_cfg(data, steps=2, ema=0.0), tmp_path / "run", progress=False)
    state = _state(tmp_path / "run" / CHECKPOINT)
    assert state["ema"] is None
    weights = torch.load(tmp_path / "run" / "ddpm.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(v, state["model"][k]) for k, v in weights.items())  # the raw weights


def test_ema_decay_is_fixed_from_the_first_step(data):
    """`ema` is the decay itself (no warm-up ramp): after one step, ema = d * init + (1 - d) * trained."""
    from d3n.data.layout import DatasetLayout
    from d3n.train.ddpm.model import load_images

    cfg = _cfg(data, ema=0.9)
    images = load_images(DatasetLayout.open(data).images("train")[:4], 16)
    trainer = ddpm_train.Trainer(cfg, images, total=1)
    init = {k: v.clone() for k, v in trainer.unet.state_dict().items()}
    trainer.train_step()
    now = trainer.unet.state_dict()
    for k, v in trainer.ema.ema.state_dict().items():
        if v.dtype.is_floating_point:
            torch.testing.assert_close(v, 0.9 * init[k] + 0.1 * now[k])


def test_data_order_is_a_function_of_seed_and_epoch():
    a = batch_indices(7, 10, 3, seed=0)
    assert torch.equal(a, batch_indices(7, 10, 3, seed=0))
    epoch0 = torch.cat([batch_indices(s, 9, 3, seed=0) for s in range(3)])
    assert sorted(epoch0.tolist()) == list(range(9))


def test_cli_ddpm_train(data, tmp_path):
    from d3n.cli import main

    rc = main(["ddpm", "train", "--data", str(data), "--out", str(tmp_path / "r"), "--size", "16",
               "--steps", "1", "--batch", "2"])
    assert rc == 0 and (tmp_path / "r" / "manifest.json").exists()
    assert main(["ddpm", "train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x"),
                 "--steps", "1"]) == 1


NO_GPU = not torch.cuda.is_available()


def test_device_option_is_validated_and_auto_resolves(data):
    from d3n.config import validate
    from d3n.errors import ConfigError
    from d3n.train.device import resolve_device

    for ok in ("cpu", "cuda", "cuda:1", "auto"):
        assert validate(DDPMTrainConfig, {"data": str(data), "device": ok}).device == ok
    with pytest.raises(ConfigError, match=r"device: .*expected cpu, cuda, cuda:N or auto.*got 'gpu'"):
        validate(DDPMTrainConfig, {"data": str(data), "device": "gpu"})
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cpu" if NO_GPU else "cuda")
    with pytest.raises(ConfigError, match="got 'cuda:x'"):
        resolve_device("cuda:x")


def test_device_is_not_part_of_the_run_identity(data, tmp_path):
    run = tmp_path / "run"
    first = train_ddpm(_cfg(data, steps=2), run, progress=False)
    assert first["device"] == "cpu"
    ckpt = torch.load(run / CHECKPOINT, weights_only=True)
    assert "device" not in ckpt["config"] and ckpt["config"]["data"] == str(data)
    stamp = (run / "manifest.json").stat().st_mtime_ns
    again = train_ddpm(_cfg(data, steps=2, device="auto"), run, progress=False)  # complete: not retrained
    assert again == first and (run / "manifest.json").stat().st_mtime_ns == stamp
    (run / "manifest.json").unlink()  # unfinished run: resumes under another device, no "different config"
    assert train_ddpm(_cfg(data, steps=2, device="auto"), run, progress=False)["steps"] == 2


@pytest.mark.skipif(not NO_GPU, reason="a CUDA device is available here")
def test_unavailable_cuda_is_a_clear_error(data, tmp_path, capsys):
    from d3n.cli import main
    from d3n.errors import D3NError

    with pytest.raises(D3NError, match="device 'cuda:1' is not available"):
        train_ddpm(_cfg(data, device="cuda:1"), tmp_path / "r", progress=False)
    rc = main(["ddpm", "train", "--data", str(data), "--out", str(tmp_path / "c"), "--size", "16",
               "--steps", "1", "--device", "cuda"])
    err = capsys.readouterr().err
    assert rc == 1 and "device 'cuda' is not available" in err and "Traceback" not in err


def test_cli_ddpm_train_device_auto(data, tmp_path, capsys):
    from d3n.cli import main

    rc = main(["ddpm", "train", "--data", str(data), "--out", str(tmp_path / "r"), "--size", "16",
               "--steps", "1", "--batch", "2", "--device", "auto"])
    assert rc == 0 and json.loads((tmp_path / "r" / "metrics.json").read_text())["device"] == (
        "cpu" if NO_GPU else "cuda")
    assert main(["ddpm", "train", "--data", str(data), "--out", str(tmp_path / "x"), "--steps", "1",
                 "--device", "tpu"]) == 1
    assert "device: Value error, expected cpu, cuda" in capsys.readouterr().err
