"""`d3n pipeline`: the whole chain at micro scale, skipping finished stages, resuming a killed one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from d3n.cli import main
from d3n.pipeline import load_config
from d3n.stages import NAMES

STAGES = [s for s in NAMES if s not in ("generator", "augment")]  # on only with an augment: section

ROOT = Path(__file__).resolve().parents[2]

def test_every_stage_writes_a_complete_run_folder(micro_pipeline):
    _, out = micro_pipeline
    for stage in STAGES:
        man = json.loads((out / stage / "manifest.json").read_text())
        assert man["complete"] is True, stage
    report = (out / "report.md").read_text()
    assert "| mAP50 |" in report and "baseline" in report and "student" in report
    assert (out / "report.png").exists()
    teacher = json.loads((out / "teacher" / "metrics.json").read_text())
    assert set(teacher["branch_weights"]) == {"p3", "p4", "p5"}
    assert (out / "teacher" / "branch_weights.png").exists()
    baseline = json.loads((out / "baseline" / "metrics.json").read_text())
    assert teacher["gflops"] > baseline["gflops"] > 0  # the fusion costs FLOPs on top of the same detector


def test_student_is_a_plain_ultralytics_yolov5s_without_teacher_weights(micro_pipeline):
    from d3n.offline import ultralytics

    _, out = micro_pipeline
    student = json.loads((out / "distill" / "metrics.json").read_text())
    baseline = json.loads((out / "baseline" / "metrics.json").read_text())
    assert student["params"] == baseline["params"] and student["gflops"] == baseline["gflops"]
    assert student["same_params_and_flops_as_baseline"] is True
    ckpt = torch.load(out / "distill" / "best.pt", weights_only=False)
    keys = list(ckpt["model"].state_dict())
    assert not any("fusion" in k for k in keys)
    assert type(ckpt["model"]).__name__ == "DetectionModel"
    yolo = ultralytics().YOLO(str(out / "distill" / "best.pt"))
    img = next((out / "data" / "dataset" / "images" / "val").iterdir())
    assert len(yolo.predict(str(img), imgsz=96, verbose=False)) == 1
    sidecar = json.loads((out / "export" / "student.json").read_text())
    assert sidecar["imgsz"] == [96, 96]


def test_rerun_skips_finished_stages(micro_pipeline, capsys):
    cfg, out = micro_pipeline
    before = {s: (out / s / "manifest.json").stat().st_mtime_ns for s in STAGES}
    assert main(["pipeline", str(cfg)]) == 0
    after = {s: (out / s / "manifest.json").stat().st_mtime_ns for s in STAGES}
    assert before == after
    status = json.loads((out / "report.json").read_text())["status"]
    assert all(v.startswith("skipped") for v in status.values()), status


def test_other_device_or_workers_rerun_nothing(micro_pipeline, tmp_path):
    """Placement fields never enter a stage key: a chain started on one device with one worker
    count and continued with another reruns nothing (it used to retrain all three detectors)."""
    cfg, out = micro_pipeline
    data = yaml.safe_load(cfg.read_text())
    data["train"] = {**data["train"], "device": "auto", "workers": 1}
    moved = tmp_path / "placed.yaml"
    moved.write_text(yaml.safe_dump(data))
    assert main(["pipeline", str(moved)]) == 0
    status = json.loads((out / "report.json").read_text())["status"]
    assert all(v.startswith("skipped") for v in status.values()), status


def test_moved_run_folder_stays_up_to_date(micro_pipeline, tmp_path):
    """A run folder copied elsewhere (another disk, another machine) is not recomputed."""
    import shutil

    cfg, out = micro_pipeline
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    assert main(["pipeline", str(cfg), "--out", str(moved)]) == 0
    status = json.loads((moved / "report.json").read_text())["status"]
    assert all(v.startswith("skipped") for v in status.values()), status


def test_killed_stage_resumes_and_changed_config_reruns(micro_pipeline, tmp_path, monkeypatch):
    """Kill the baseline after its training, before its manifest: the rerun resumes, not restarts."""
    from d3n.pipeline import Pipeline
    from d3n.train.detector import baseline

    cfg_path, _ = micro_pipeline
    data = yaml.safe_load(cfg_path.read_text())
    data["out"] = str(tmp_path / "run")
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(data))
    stages = ["data", "baseline"]

    real_finish = baseline.finish

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(baseline, "finish", killed)
    with pytest.raises(KeyboardInterrupt):
        Pipeline(load_config(path)).run(stages)
    assert (tmp_path / "run" / "baseline" / "last_state.pt").exists()
    assert not (tmp_path / "run" / "baseline" / "manifest.json").exists()

    monkeypatch.setattr(baseline, "finish", real_finish)
    p = Pipeline(load_config(path))
    p.run(stages)
    assert p.status == {"data": "skipped (up to date)", "baseline": "resumed"}
    history = (tmp_path / "run" / "baseline" / "results.csv").read_text().strip().splitlines()
    assert len(history) == 2  # header + the one epoch trained before the kill, not retrained

    data["train"]["seed"] = 1  # a changed config starts the stage afresh
    path.write_text(yaml.safe_dump(data))
    p = Pipeline(load_config(path))
    p.run(stages)
    assert p.status["baseline"] == "ran"


def test_checkpoints_chosen_on_val_numbers_reported_on_test(micro_pipeline):
    _, out = micro_pipeline
    for stage in ("baseline", "teacher", "distill"):
        m = json.loads((out / stage / "metrics.json").read_text())
        assert m["selected_on"] == "val" and m["report_split"] == "test", stage
        assert set(m["test"]) >= {"mAP50", "mAP50-95", "per_class_AP50"} and m["val"]["mAP50"] == m["mAP50"]
    assert (out / "compress" / "test" / "manifest.json").exists()  # the teacher's test features
    report = (out / "report.md").read_text()
    assert "## Detection (test split (checkpoints chosen on val))" in report


def _capture_start(monkeypatch, module):
    """Replace the stage's call of the training loop by one that records the model it was given."""
    seen = {}

    class Stop(Exception):
        pass

    def fake_train(task, *a, **k):
        seen["model"] = {k: v.detach().clone() for k, v in task.model.state_dict().items()}
        raise Stop

    monkeypatch.setattr(module, "train", fake_train)
    return seen, Stop


def test_initial_weights_reach_baseline_teacher_and_student(micro_pipeline, tmp_path, monkeypatch):
    """One weights file starts all three detectors (and init: baseline starts the teacher from the
    trained baseline): the parameters each starts training with are the file's."""
    from d3n.distill import trainer
    from d3n.train.detector import baseline
    from d3n.train.detector import model as detector
    from d3n.train.detector.loop import TrainConfig
    from d3n.train.teacher import stage as teacher

    _, out = micro_pipeline
    data = out / "data" / "dataset"
    weights = tmp_path / "init.pt"
    src = detector.load(out / "baseline" / "best.pt")
    with torch.no_grad():
        for p in src.parameters():
            p.add_(0.01)
    detector.save(src, weights, {}, {})
    want = detector.load(weights).state_dict()
    tcfg = TrainConfig(imgsz=96, epochs=1, batch=8, workers=0, weights=weights)
    repos = {"repo": out / "compress" / "train", "val_repo": out / "compress" / "val",
             "test_repo": out / "compress" / "test"}

    def same(got: dict, prefix: str = "") -> bool:
        keys = [k for k in want if k.startswith("model.") and "cv3" not in k and "dfl" not in k]
        return all(torch.equal(got[prefix + k].float(), want[k].float()) for k in keys)

    for module, run in [
        (baseline, lambda: baseline.run(baseline.Config(train=tcfg), {"data": data}, tmp_path / "b")),
        (trainer, lambda: trainer.run(trainer.Config(train=tcfg), {"data": data, "repo": repos["repo"],
                                                                   "teacher": out / "teacher" / "best.pt"},
                                      tmp_path / "s")),
        (teacher, lambda: teacher.run(teacher.Config(train=tcfg), {"data": data, **repos}, tmp_path / "t")),
    ]:
        seen, stop = _capture_start(monkeypatch, module)
        with pytest.raises(stop):
            run()
        assert same(seen["model"], "detector." if module is teacher else ""), module.__name__
    seen, stop = _capture_start(monkeypatch, teacher)
    with pytest.raises(stop):
        teacher.run(teacher.Config(init="baseline", train=tcfg.model_copy(update={"weights": None})),
                    {"data": data, **repos, "baseline": out / "baseline" / "best.pt"}, tmp_path / "t2")
    base = detector.load(out / "baseline" / "best.pt").state_dict()
    assert all(torch.equal(seen["model"]["detector." + k].float(), v.float()) for k, v in base.items()
               if k.startswith("model."))


def test_missing_initial_weights_name_the_file(micro_pipeline, tmp_path):
    cfg, _ = micro_pipeline
    data = yaml.safe_load(cfg.read_text())
    data["weights"] = "nowhere/yolov5s.pt"
    data["out"] = str(tmp_path / "run")
    path = tmp_path / "w.yaml"
    path.write_text(yaml.safe_dump(data))
    from d3n.errors import ArtifactError
    from d3n.pipeline import Pipeline

    with pytest.raises(ArtifactError, match="nowhere/yolov5s.pt: initial weights not found"):
        Pipeline(load_config(path)).run(["data", "baseline"])


@pytest.mark.parametrize("name", ["demo.yaml", "neu-det.yaml", "neu-det-cpu.yaml", "synth-rare.yaml"])
def test_shipped_configs_validate(name):
    cfg = load_config(ROOT / "configs" / name)
    assert cfg.train.imgsz % 32 == 0


def test_bad_config_names_file_and_field(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"data": {"synth": {"images": 4}}, "train": {"epochs": "many"}}))
    assert main(["pipeline", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "epochs" in err


def test_ddpm_schedule_missing_is_named_before_it_trains(micro_config, tmp_path, capsys):
    cfg = tmp_path / "noschedule.yaml"
    cfg.write_text(yaml.safe_dump({**micro_config, "out": str(tmp_path / "run"),
                                   "ddpm": {**micro_config["ddpm"], "steps": None}}))
    assert main(["pipeline", str(cfg), "--stages", "data,ddpm"]) == 1
    assert "exactly one of ddpm.steps or ddpm.epochs" in capsys.readouterr().err
    assert not (tmp_path / "run" / "ddpm").exists()


def test_augment_section_feeds_every_later_stage_the_augmented_dataset(micro_config, tmp_path):
    """With `augment:` the generator and augment stages run, and the chain after them reads
    augment/dataset: the repository holds the generated train images' features too."""
    cfg = tmp_path / "aug.yaml"
    cfg.write_text(yaml.safe_dump({**micro_config, "out": str(tmp_path / "run"), "augment": {
        "method": "sdedit", "classes": ["scratches"], "count": 2, "steps": 3, "masks": "boxes",
        "generator": {"size": 16, "steps": 3, "epochs": None, "batch": 4, "min_side": 16}}}))
    assert main(["pipeline", str(cfg), "--stages", "data,generator,augment,ddpm,repo"]) == 0
    run = tmp_path / "run"
    made = [it["image"].removesuffix(".png") for it in
            json.loads((run / "augment" / "dataset" / "augment.json").read_text())["items"]]
    assert len(made) == 2 and (run / "generator" / "generator.pt").exists()
    ids = json.loads((run / "repo" / "train" / "store.json").read_text())["image_ids"]
    assert set(made) <= set(ids)
    assert not any(i.startswith("aug_") for i in json.loads((run / "repo" / "val" / "store.json").read_text())["image_ids"])
    assert json.loads((run / "ddpm" / "manifest.json").read_text())["inputs"]["data_yaml"].startswith(
        str(run / "augment" / "dataset"))


def test_augment_stages_are_off_without_the_section(micro_pipeline, capsys):
    cfg, out = micro_pipeline
    assert not (out / "generator").exists() and not (out / "augment").exists()
    assert main(["pipeline", str(cfg), "--stages", "augment"]) == 1
    assert "off in this config" in capsys.readouterr().err


def test_augment_section_quality_check_with_a_detector(micro_config, tmp_path):
    from d3n.train.detector import model as detector

    blind = tmp_path / "blind.pt"  # an untrained detector sees nothing: every image is rejected
    detector.save(detector.build(6, ["crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale",
                                     "scratches"]), blind, {"imgsz": 96}, {})
    cfg = tmp_path / "aug.yaml"
    cfg.write_text(yaml.safe_dump({**micro_config, "out": str(tmp_path / "run"), "augment": {
        "method": "paste", "classes": ["scratches"], "count": 2, "check_model": "blind.pt"}}))
    assert main(["pipeline", str(cfg), "--stages", "data,augment"]) == 0
    state = json.loads((tmp_path / "run" / "augment" / "dataset" / "augment.json").read_text())
    assert [it["kept"] for it in state["items"]] == [False, False]
    assert state["plan"]["check_model"] == str(blind)
