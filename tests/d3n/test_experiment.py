"""`d3n experiment`: cells share the stages they have in common, a killed cell resumes, the
statistics give known answers, and the report holds every row and comparison."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from d3n.cli import main
from d3n.experiment.spec import cell_config, load_experiment, merge
from d3n.experiment.stats import mean_std, paired

BASE = {
    "data": {"synth": {"images": 20, "size": 96, "seed": 0, "test_frac": 0.2}},
    "ddpm": {"preset": "tiny", "size": 16, "steps": 3, "batch": 4},
    "compress": {"method": "resvae", "steps": 3, "batch": 16},
    "train": {"imgsz": 96, "epochs": 1, "batch": 8, "workers": 0, "seed": 0},
    "export": {"formats": ["onnx"]},
}


def _experiment(tmp_path: Path) -> Path:
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(BASE))
    exp = {"base": "base.yaml", "out": "study", "seeds": [0, 1], "common": {"teacher": {"init": "baseline"}},
           "variants": {"d3n": {}, "no-ddpm": {"teacher": {"fusion": {"use_ddpm": False}}}}}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(exp))
    return path


def test_known_intervals():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    wide = paired({0: 0.5, 1: 0.6, 2: 0.7}, {0: 0.4, 1: 0.4, 2: 0.4})  # diffs .1 .2 .3: t(2) = 4.303
    assert wide.n == 3 and wide.mean == pytest.approx(0.2)
    assert (wide.low, wide.high) == (pytest.approx(0.2 - 4.303 * 0.1 / 3 ** 0.5), pytest.approx(0.2 + 0.24844, abs=1e-4))
    assert wide.verdict == "no difference"
    tight = paired({0: 0.5, 1: 0.61, 2: 0.72}, {0: 0.4, 1: 0.5, 2: 0.6})  # diffs .10 .11 .12
    assert tight.verdict == "higher" and tight.low == pytest.approx(0.11 - 4.303 * 0.01 / 3 ** 0.5)
    assert paired({0: 0.1, 1: 0.2}, {1: 0.3, 2: 0.1}).verdict == "one seed: no interval"
    assert paired({0: 0.1}, {1: 0.1}) is None


def test_cell_configs_merge_and_keep_one_stage_one_seed(tmp_path):
    exp = load_experiment(_experiment(tmp_path))
    c = cell_config(exp, "no-ddpm", 1)
    assert c["seed"] == 0 and c["train"]["seed"] == 1  # one DDPM for all cells, the detectors' seed varies
    assert c["teacher"] == {"init": "baseline", "fusion": {"use_ddpm": False}}
    assert c["out"].endswith("cells/no-ddpm-s1")
    assert merge({"a": {"b": 1, "c": 2}}, {"a": {"b": 3}}) == {"a": {"b": 3, "c": 2}}


def test_runner_shares_stages_resumes_a_killed_cell_and_reports(tmp_path, monkeypatch):
    from d3n.distill import trainer

    path = _experiment(tmp_path)
    study = tmp_path / "study"
    assert main(["experiment", str(path), "--cells", "d3n-s0"]) == 0
    real = trainer.finish

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "finish", killed)  # d3n-s1 dies after its student trained
    assert main(["experiment", str(path), "--cells", "d3n-s1"]) == 130  # d3n: interrupted
    monkeypatch.setattr(trainer, "finish", real)
    # the rest side by side: 2 processes on one folder, each taking the next cell no other holds; a
    # stage both need (no-ddpm-s1's baseline is d3n-s1's) is made once and shared, never twice
    assert main(["experiment", str(path), "--jobs", "2"]) == 0
    took = [set(re.findall(r"==== cell (\S+) ====", (study / f"worker-{i}.log").read_text())) for i in range(2)]
    assert took[0] and took[1] and not took[0] & took[1], took  # each cell in one process only
    assert took[0] | took[1] == {"d3n-s0", "d3n-s1", "no-ddpm-s0", "no-ddpm-s1"}

    cells = {c.name: json.loads((c / "cell.json").read_text()) for c in (study / "cells").iterdir()}
    assert set(cells) == {"d3n-s0", "d3n-s1", "no-ddpm-s0", "no-ddpm-s1"}
    ran = {}
    for rec in cells.values():
        for stage, status in rec["status"].items():
            if status in ("ran", "resumed"):
                ran[stage] = ran.get(stage, 0) + 1
    # stage 1 once; one baseline per seed; a teacher and a student per cell
    assert ran["data"] == ran["ddpm"] == ran["repo"] == ran["resvae"] == ran["compress"] == 1
    assert ran["baseline"] == 2 and ran["teacher"] == 4 and ran["distill"] == 4
    assert cells["d3n-s1"]["status"]["distill"] == "resumed"
    # the killed cell's time is whole: the stages its first attempt finished, and the distillation
    # the first attempt trained before it died, not only what the resumed attempt did
    secs = cells["d3n-s1"]["stage_seconds"]
    assert {"baseline", "teacher", "distill", "export"} <= set(secs) and all(v > 0 for v in secs.values())
    last_attempt = json.loads((study / "cells" / "d3n-s1" / "distill" / "manifest.json").read_text())["seconds"]
    assert secs["distill"] > last_attempt + 0.5  # the killed attempt trained every epoch
    assert cells["no-ddpm-s0"]["status"]["baseline"].startswith("shared")

    report = json.loads((study / "experiment.json").read_text())
    assert set(report["rows"]) == {"baseline", "d3n teacher", "d3n student", "no-ddpm teacher", "no-ddpm student"}
    assert all(len(r["seeds"]) == 2 for r in report["rows"].values())
    pairs = {(p["a"], p["b"], p["metric"]) for p in report["paired"]}
    assert ("d3n student", "baseline", "mAP50") in pairs and ("d3n student", "no-ddpm student", "mAP50") in pairs
    md = (study / "experiment.md").read_text()
    assert "test** split (checkpoints chosen on val)" in md and "95 % interval" in md
    for fig in ("fig11_branch_weights.png", "fig12_curves.png", "fig13_map_vs_gflops.png", "fig14_gradcam.png"):
        assert (study / fig).exists(), fig
    assert main(["experiment", str(path), "--gather"]) == 0


def test_a_cell_another_process_holds_is_left_to_it(tmp_path):
    from d3n.experiment.runner import CELL_LOCK, cell_states, run_experiment
    from d3n.experiment.share import try_exclusive
    from d3n.experiment.spec import load_experiment

    exp = load_experiment(_experiment(tmp_path))
    exp.variants = {"d3n": exp.variants["d3n"]}
    exp.seeds = [0]
    cell = exp.out / "cells" / "d3n-s0"
    with try_exclusive(cell / CELL_LOCK) as held:  # as if another process ran it
        assert held
        result = run_experiment(exp)
        assert [s["state"] for s in cell_states(exp)] == ["running"]
    assert result["elsewhere"] == ["d3n-s0"] and result["cells"] == []
    assert not (cell / "data").exists()
    assert [s["state"] for s in cell_states(exp)] == ["waiting"]


def test_status_says_where_each_cell_stands(tmp_path, capsys):
    path = _experiment(tmp_path)
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), "seeds": [0],
                                                       "stages": ["data", "baseline"]}))
    assert main(["experiment", str(path), "--cells", "d3n-s0"]) == 0
    (tmp_path / "study" / "cells" / "no-ddpm-s0" / "data").mkdir(parents=True)  # begun, then killed
    (tmp_path / "study" / "cells" / "no-ddpm-s0" / "data" / ".pipeline.json").write_text("{}")
    capsys.readouterr()
    assert main(["experiment", str(path), "--status"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"d3n-s0 +done", out) and re.search(r"no-ddpm-s0 +stopped +at data", out)
    assert "1 done, 0 running, 1 stopped, 0 waiting of 2 cells" in out


def test_stage_lock_waits_for_the_holder(tmp_path):
    # a second process that needs a stage being made waits for the lock, then finds the folder
    import multiprocessing as mp
    import time

    from d3n.experiment.share import StageShare

    share = StageShare(tmp_path / "cells")
    ctx = mp.get_context("fork")
    started = ctx.Event()

    def hold():
        with share.making("k" * 64, "ddpm"):
            started.set()
            time.sleep(1.0)
            (tmp_path / "made").write_text("x")

    p = ctx.Process(target=hold)
    p.start()
    assert started.wait(30)
    with share.making("k" * 64, "ddpm"):
        assert (tmp_path / "made").exists()  # not entered before the holder let go
    p.join(30)
    assert p.exitcode == 0


def test_jobs_and_devices_are_checked(tmp_path, capsys):
    path = _experiment(tmp_path)
    assert main(["experiment", str(path), "--jobs", "2", "--devices", "gpu0"]) == 1
    assert "--devices" in capsys.readouterr().err
    assert main(["experiment", str(path), "--cells", "nope-s9", "--jobs", "2"]) == 1
    assert "unknown cells" in capsys.readouterr().err
    assert not (tmp_path / "study" / "worker-0.log").exists()


def test_augmentation_study_runs_only_its_stages_and_compares_baselines(tmp_path):
    """`stages:` limits every cell to data -> [augment] -> baseline; the plain variant has no
    augment stage; the report compares the augmented baseline with the plain one, per seed."""
    base = {**BASE, "data": {"synth": {"images": 20, "size": 96, "seed": 0, "test_frac": 0.2,
                                       "rare": "crazing", "rare_keep": 0.0}}}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    exp = {"base": "base.yaml", "out": "study", "seeds": [0], "stages": ["data", "generator", "augment", "baseline"],
           "variants": {"plain": {}, "paste": {"augment": {"method": "paste", "classes": ["scratches"], "count": 2}}},
           "classes": ["scratches"]}
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(exp, sort_keys=False))  # plain first: its baseline is the row
    assert main(["experiment", str(tmp_path / "exp.yaml")]) == 0
    cells = tmp_path / "study" / "cells"
    assert sorted(p.name for p in (cells / "plain-s0").iterdir() if p.is_dir()) == ["baseline", "data"]
    assert sorted(p.name for p in (cells / "paste-s0").iterdir() if p.is_dir()) == ["augment", "baseline", "data"]
    report = json.loads((tmp_path / "study" / "experiment.json").read_text())
    assert set(report["rows"]) == {"baseline", "paste baseline"}
    assert any(p["a"] == "paste baseline" and p["b"] == "baseline" for p in report["paired"])
    # the topped-up class's own AP50 is paired too: the mean over classes hides it
    pair = next(p for p in report["paired"] if p["metric"] == "AP50 scratches")
    per_class = {r: next(iter(row["seeds"].values()))["per_class_AP50"]["scratches"] for r, row in report["rows"].items()}
    assert pair["mean"] == pytest.approx(per_class["paste baseline"] - per_class["baseline"])
    # rare: the train split has no crazing box left (rare_keep 0), val and test keep theirs
    data = cells / "plain-s0" / "data" / "dataset"
    train_classes = {line.split()[0] for f in (data / "labels" / "train").glob("*.txt") for line in f.read_text().splitlines()}
    assert "0" not in train_classes


def test_paired_classes_must_be_the_datas():
    from d3n.errors import ConfigError
    from d3n.experiment.report import paired_table
    from d3n.experiment.spec import ExperimentConfig

    rows = {r: {"seeds": {0: {"mAP50": 0.5, "per_class_AP50": {"crazing": ap}}}} for r, ap in
            (("baseline", 0.1), ("paste baseline", 0.3))}
    exp = ExperimentConfig(base="b.yaml", variants={"plain": {}, "paste": {}}, classes=["crazing"])
    lines, out = paired_table(exp, rows)
    assert [(p["metric"], round(p["mean"], 6)) for p in out] == [("mAP50", 0.0), ("AP50 crazing", 0.2)]
    with pytest.raises(ConfigError, match=r"classes: \['crazng'\] .* \['crazing'\]"):
        paired_table(exp.model_copy(update={"classes": ["crazng"]}), rows)


@pytest.mark.parametrize("name", ["neu-det-cpu.yaml", "synth-rare-class.yaml", "neu-det-augment.yaml"])
def test_shipped_experiments_validate_cell_by_cell(name):
    from d3n.config import validate
    from d3n.pipeline import PipelineConfig

    exp = load_experiment(Path(__file__).resolve().parents[2] / "experiments" / name)
    for variant in exp.variants:
        validate(PipelineConfig, cell_config(exp, variant, exp.seeds[0]), f"{name}: {variant}")


def test_a_variant_runs_only_its_stages_and_the_file_adds_comparisons(tmp_path):
    """A variant's own `stages:` (a longer baseline alone) and `compare:` pairs in the report."""
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(BASE))
    exp = {"base": "base.yaml", "out": "study", "seeds": [0],
           "variants": {"plain": {"stages": ["data", "baseline"]},
                        "long": {"train": {"epochs": 2}, "stages": ["data", "baseline"]}},
           "compare": [["baseline", "long baseline"]]}
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(exp, sort_keys=False))
    loaded = load_experiment(tmp_path / "exp.yaml")
    assert "stages" not in cell_config(loaded, "long", 0) and cell_config(loaded, "long", 0)["train"]["epochs"] == 2
    assert main(["experiment", str(tmp_path / "exp.yaml"), "--cells", "plain-s0"]) == 0
    md = (tmp_path / "study" / "experiment.md").read_text()
    assert "Not yet reported (a row has no finished cell): baseline − long baseline" in md
    assert main(["experiment", str(tmp_path / "exp.yaml")]) == 0
    cells = tmp_path / "study" / "cells"
    assert sorted(p.name for p in (cells / "long-s0").iterdir() if p.is_dir()) == ["baseline", "data"]
    report = json.loads((tmp_path / "study" / "experiment.json").read_text())
    assert set(report["rows"]) == {"baseline", "long baseline"}
    pairs = {(p["a"], p["b"]) for p in report["paired"]}
    assert pairs == {("long baseline", "baseline")}  # the file's reversed pair is the same comparison


@pytest.mark.parametrize("change, named", [
    ({"compare": [["d3n teacher", "long baseline"]]}, "long baseline"),
    ({"compare": [["d3n baseline", "baseline"]]}, "d3n baseline"),  # the first variant's is "baseline"
    ({"variants": {"d3n": {}, "short": {"stages": ["data", "baseline"]}},
      "compare": [["short teacher", "baseline"]]}, "short teacher"),  # its stages train no teacher
    ({"variants": {"d3n": {"stages": ["data", "baseline", "teachr"]}}}, "teachr"),
    ({"variants": {"d3n": {"stages": []}}}, "non-empty list"),
    ({"variants": {"d3n": {"stages": None}}}, "non-empty list"),
])
def test_experiment_file_names_what_it_cannot_run(tmp_path, change, named):
    from d3n.errors import ConfigError

    path = _experiment(tmp_path)
    raw = {**yaml.safe_load(path.read_text()), **change}
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=named):
        load_experiment(path)


def test_a_shared_copy_cut_short_leaves_nothing_that_looks_finished(tmp_path, monkeypatch):
    import shutil

    from d3n.experiment.share import StageShare

    src = tmp_path / "cells" / "a" / "ddpm"
    src.mkdir(parents=True)
    for name, text in (("manifest.json", "{}"), (".pipeline.json", '{"key": "k"}'), ("weights.bin", "w")):
        (src / name).write_text(text)
    share = StageShare(tmp_path / "cells")
    assert share.lookup("k") == src
    real = shutil.copytree

    def cut(a, b, **kw):  # the process dies half-way through the copy
        real(a, b, **{**kw, "ignore": lambda d, names: [n for n in names if n != "manifest.json"]})
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "copytree", cut)
    dst = tmp_path / "cells" / "b" / "ddpm"
    with pytest.raises(KeyboardInterrupt):
        share.copy(src, dst)
    assert not dst.exists() and not list(dst.parent.iterdir())
    monkeypatch.setattr(shutil, "copytree", real)
    share.copy(src, dst)  # whole: every file but the state file, which the pipeline writes for dst
    assert sorted(p.name for p in dst.iterdir()) == ["manifest.json", "weights.bin"]
