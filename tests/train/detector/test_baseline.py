"""Baseline YOLOv5s: trains through the real loop, writes an ultralytics checkpoint, `d3n val` scores it."""

from __future__ import annotations

import json

import pytest
import torch

from d3n.cli import main
from d3n.train.detector import model as detector
from d3n.train.detector.loop import TrainConfig, train

TINY = {"imgsz": 128, "epochs": 1, "batch": 8, "workers": 0}


@pytest.fixture(scope="module")
def baseline_run(synth_small, tmp_path_factory):
    out = tmp_path_factory.mktemp("baseline") / "run"
    rc = main(["train", "baseline", "--data", str(synth_small), "--out", str(out),
               *[f"--{k}={v}" for k, v in TINY.items()]])
    assert rc == 0
    return out


def test_baseline_writes_run_folder(baseline_run):
    for f in ("best.pt", "last.pt", "metrics.json", "config.yaml", "manifest.json", "results.csv",
              "results.png", "per_class_ap50.png"):
        assert (baseline_run / f).exists(), f
    m = json.loads((baseline_run / "metrics.json").read_text())
    for k in ("mAP50", "mAP50-95", "precision", "recall", "per_class_AP50", "params", "gflops", "imgsz",
              "epochs", "seed"):
        assert k in m
    assert m["params"] == sum(p.numel() for p in detector.build(6, list("abcdef")).parameters())
    assert set(m["per_class_AP50"]) == {"crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale",
                                        "scratches"}
    assert 20 < m["gflops_at_640"] < 30  # YOLOv5s (v5u head) is ~24 GFLOPs at 640


def test_checkpoint_opens_in_ultralytics_and_d3n_val_scores_it(baseline_run, synth_small, tmp_path):
    from d3n.offline import ultralytics

    yolo = ultralytics().YOLO(str(baseline_run / "best.pt"))
    assert yolo.task == "detect" and len(yolo.names) == 6
    results = yolo.predict(str(synth_small / "images" / "val"), imgsz=128, verbose=False)
    assert len(results) == len(list((synth_small / "images" / "val").iterdir()))
    out = tmp_path / "val.json"
    rc = main(["val", "--model", str(baseline_run / "best.pt"), "--data", str(synth_small), "--imgsz", "128",
               "--json", str(out)])
    assert rc == 0
    m = json.loads(out.read_text())
    assert m["images"] == len(results) and 0.0 <= m["mAP50"] <= 1.0 and m["instances"] > 0


def test_val_reports_bad_checkpoint(tmp_path, synth_small, capsys):
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["val", "--model", str(bad), "--data", str(synth_small)]) == 1
    assert "broken.pt" in capsys.readouterr().err


class _Kill(Exception):
    pass


def test_killed_training_resumes_to_the_same_weights(synth_small, tmp_path):
    """Kill during epoch 2 of 2 (after epoch 1 was saved), rerun: equals an uninterrupted run."""
    cfg = TrainConfig(**{**TINY, "epochs": 2, "close_mosaic": 0})
    names = ["crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches"]

    def fresh():
        torch.manual_seed(0)
        return detector.DetectorTask(detector.build(6, names), {})

    full = tmp_path / "full"
    train(fresh(), cfg, synth_small, full, names)

    killed = tmp_path / "killed"

    def kill_in_epoch_2(model, epoch):
        if epoch == 1:
            raise _Kill

    with pytest.raises(_Kill):
        train(fresh(), cfg, synth_small, killed, names, on_epoch=kill_in_epoch_2)
    state = torch.load(killed / "last_state.pt", weights_only=True)["state"]  # plain data only
    assert state["epoch"] == 0  # epoch 1 saved, epoch 2 lost
    result = train(fresh(), cfg, synth_small, killed, names)
    assert [r["epoch"] for r in result["history"]] == [1, 2]
    a = torch.load(full / "last_state.pt", weights_only=True)["state"]
    b = torch.load(killed / "last_state.pt", weights_only=True)["state"]
    assert a["ema"]["updates"] == b["ema"]["updates"] > 0
    for name, x, y in (("model", a["model"], b["model"]), ("ema", a["ema"]["weights"], b["ema"]["weights"])):
        for k in x:
            torch.testing.assert_close(x[k], y[k], rtol=0, atol=0, msg=f"{name}.{k}")


def test_resume_under_another_config_is_refused(synth_small, tmp_path):
    """A state saved under one TrainConfig is not continued under another (the field is named);
    device and workers place the run and may change."""
    from d3n.errors import ArtifactError

    cfg = TrainConfig(**{**TINY, "epochs": 2, "close_mosaic": 0})
    names = ["crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches"]

    def fresh():
        torch.manual_seed(0)
        return detector.DetectorTask(detector.build(6, names), {})

    def kill_in_epoch_2(model, epoch):
        if epoch == 1:
            raise _Kill

    with pytest.raises(_Kill):
        train(fresh(), cfg, synth_small, tmp_path, names, on_epoch=kill_in_epoch_2)
    with pytest.raises(ArtifactError, match=r"last_state.pt: .*different config \(train.lr0: 0.01 -> 0.02\)"):
        train(fresh(), cfg.model_copy(update={"lr0": 0.02}), synth_small, tmp_path, names)
    moved = cfg.model_copy(update={"device": "auto" if not torch.cuda.is_available() else "cpu", "workers": 1})
    result = train(fresh(), moved, synth_small, tmp_path, names)
    assert [r["epoch"] for r in result["history"]] == [1, 2]


def test_device_is_checked_before_training(synth_small, tmp_path, capsys):
    rc = main(["train", "baseline", "--data", str(synth_small), "--out", str(tmp_path / "a"), "--device", "gpu0"])
    assert rc != 0 and "device" in capsys.readouterr().err
    if not torch.cuda.is_available():
        rc = main(["train", "baseline", "--data", str(synth_small), "--out", str(tmp_path / "b"), "--device", "cuda",
                   *[f"--{k}={v}" for k, v in TINY.items() if k != "device"]])
        err = capsys.readouterr().err
        assert rc != 0 and "'cuda' is not available" in err


def test_val_reports_image_level_rates_when_the_split_has_defect_free_images(baseline_run, synth_small,
                                                                             tmp_path, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(synth_small, data)
    first = sorted((data / "labels" / "val").glob("*.txt"))[0]
    first.write_text("")  # that val image is now defect-free
    out = tmp_path / "val.json"
    assert main(["val", "--model", str(baseline_run / "best.pt"), "--data", str(data), "--imgsz", "128",
                 "--json", str(out)]) == 0
    m = json.loads(out.read_text())
    assert m["clean_images"] == 1 and m["defect_images"] == m["images"] - 1
    assert m["overkill_rate"] in (0.0, 1.0) and 0.0 <= m["miss_rate"] <= 1.0
    printed = capsys.readouterr().out
    assert "miss_rate" in printed and "overkill_rate" in printed
