"""The training-state format, the guarded loader and the EMA shared by the trainers."""

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from d3n.artifacts import load_torch
from d3n.config import identity
from d3n.errors import ArtifactError
from d3n.train.checkpoint import (
    EMA,
    STATE_FORMAT,
    load_state,
    plain,
    rng_state,
    save_state,
    set_rng_state,
)
from d3n.train.detector.loop import TrainConfig


def _ident(**kw) -> dict:
    return {"train": identity(TrainConfig(**kw), mode="json"), "task": "DetectorTask"}


def test_state_round_trips_under_weights_only(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    opt.param_groups[0]["lr"] = np.float64(0.05)  # as np.interp leaves it during warm-up
    state = {"model": model.state_dict(), "opt": opt.state_dict(), "rng": rng_state(),
             "best": {"mAP50": np.float32(0.5), "curve": np.arange(3)}, "where": Path("a/b")}
    path = save_state(tmp_path / "s.pt", state, _ident())
    blob = torch.load(path, weights_only=True)  # raises if anything needs unpickling code
    assert blob["format"] == STATE_FORMAT and blob["config"] == _ident()
    got = load_state(path, _ident())
    assert torch.equal(got["model"]["weight"], model.weight.detach())
    assert got["opt"]["param_groups"][0]["lr"] == 0.05 and got["best"]["mAP50"] == 0.5
    assert torch.equal(got["best"]["curve"], torch.arange(3)) and got["where"] == "a/b"


def test_resume_refused_when_a_train_config_field_changes(tmp_path):
    path = save_state(tmp_path / "last_state.pt", {"epoch": 0}, _ident(lr0=0.01, epochs=5))
    with pytest.raises(ArtifactError) as err:
        load_state(path, _ident(lr0=0.02, epochs=5))
    msg = str(err.value)
    assert "last_state.pt" in msg and "train.lr0: 0.01 -> 0.02" in msg and "epochs" not in msg
    with pytest.raises(ArtifactError, match=r"train.epochs: 5 -> 6.*train.lr0"):
        load_state(path, _ident(lr0=0.02, epochs=6))  # every differing field is named
    with pytest.raises(ArtifactError, match="task: 'DetectorTask' -> 'TeacherTask'"):
        load_state(path, {**_ident(lr0=0.01, epochs=5), "task": "TeacherTask"})


def test_resume_accepted_when_only_placement_changes(tmp_path):
    path = save_state(tmp_path / "s.pt", {"epoch": 3}, _ident(device="cpu", workers=2))
    assert load_state(path, _ident(device="cuda:1", workers=8)) == {"epoch": 3}


def test_state_is_plain_detached_cpu_data(tmp_path):
    w = torch.ones(2, requires_grad=True, device="cuda" if torch.cuda.is_available() else "cpu")
    got = plain({"x": [w], "t": (1, None)})
    assert got["x"][0].device.type == "cpu" and not got["x"][0].requires_grad and got["t"] == (1, None)
    with pytest.raises(TypeError, match=r"state.fn: a function"):
        save_state(tmp_path / "s.pt", {"fn": lambda: 0}, {})
    assert not (tmp_path / "s.pt").exists()  # nothing half-written


def test_rng_state_restores_every_stream(tmp_path):
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    np.random.normal()  # leaves a cached gaussian in the legacy NumPy state
    path = save_state(tmp_path / "s.pt", {"rng": rng_state()}, {})
    want = (random.random(), np.random.normal(), np.random.rand(), torch.rand(1))
    random.seed(2)
    np.random.seed(2)
    torch.manual_seed(2)
    set_rng_state(load_state(path, {})["rng"])
    got = (random.random(), np.random.normal(), np.random.rand(), torch.rand(1))
    assert got[:3] == want[:3] and torch.equal(got[3], want[3])


def test_guarded_loader_names_the_file(tmp_path):
    with pytest.raises(ArtifactError, match=r"none.pt: compressor file not found"):
        load_torch(tmp_path / "none.pt", "compressor file")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ArtifactError, match=r"junk.pt: not a readable DDPM weights file \("):
        load_torch(junk, "DDPM weights file")
    with pytest.raises(ArtifactError, match=r"(?s)junk.pt: not a readable training state .*delete it to start over"):
        load_state(junk, {})


def test_guarded_loader_refuses_pickled_code_by_default(tmp_path):
    path = tmp_path / "obj.pt"
    torch.save({"model": torch.nn.Linear(1, 1)}, path)  # a pickled module, as ultralytics saves
    with pytest.raises(ArtifactError, match="obj.pt: not a readable checkpoint"):
        load_torch(path, "checkpoint")
    assert isinstance(load_torch(path, "checkpoint", weights_only=False)["model"], torch.nn.Linear)


def test_a_foreign_file_is_not_a_training_state(tmp_path):
    torch.save({"epoch": 1}, tmp_path / "old.pt")
    with pytest.raises(ArtifactError, match=r"old.pt: not a d3n training state"):
        load_state(tmp_path / "old.pt", {})


def test_ema_ramp_and_fixed_decay():
    model = torch.nn.BatchNorm1d(2)
    fixed, ramped = EMA(model, 0.9), EMA(model, 0.9, tau=1.0)
    with torch.no_grad():
        model.weight.fill_(2.0)
    model.num_batches_tracked.fill_(7)
    fixed.update(model)
    ramped.update(model)
    torch.testing.assert_close(fixed.ema.weight, torch.full((2,), 0.9 * 1 + 0.1 * 2))
    d = 0.9 * (1 - np.exp(-1.0))
    torch.testing.assert_close(ramped.ema.weight, torch.full((2,), d * 1 + (1 - d) * 2))
    assert int(fixed.ema.num_batches_tracked) == 7  # integer buffers follow the model
    assert not any(p.requires_grad for p in fixed.ema.parameters())
    other = EMA(torch.nn.BatchNorm1d(2), 0.9)
    other.load_state_dict(plain(fixed.state_dict()))
    assert other.updates == 1 and torch.equal(other.ema.weight, fixed.ema.weight)
