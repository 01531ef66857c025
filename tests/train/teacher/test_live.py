"""Teacher features computed on the fly equal the repository's, and `d3n val` scores a teacher on a
split no repository holds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from d3n.cli import main
from d3n.data.layout import DatasetLayout
from d3n.train.repository.store import FeatureStore
from d3n.train.teacher.live import LiveRepository


def test_on_the_fly_features_equal_the_repository(micro_pipeline):
    _, out = micro_pipeline
    stored = FeatureStore.open(out / "compress" / "test")
    layout = DatasetLayout.open(out / "data" / "dataset")
    images = {p.stem: p for p in layout.images("test")}
    live = LiveRepository(out / "ddpm", stored.timesteps, images, out / "resvae")
    assert live.kind == stored.kind and live.levels == stored.levels
    for stem in stored.image_ids:
        a, b = live.get(stem), stored.get(stem)
        for lv in stored.levels:
            assert a[lv].shape == b[lv].shape and a[lv].dtype == np.float16
            np.testing.assert_allclose(a[lv].astype(np.float32), b[lv].astype(np.float32), atol=2e-3, rtol=2e-3)


def test_d3n_val_scores_a_teacher_with_or_without_a_repository(micro_pipeline, tmp_path, capsys):
    _, out = micro_pipeline
    args = ["val", "--model", str(out / "teacher" / "best.pt"), "--data", str(out / "data" / "dataset"),
            "--split", "test", "--imgsz", "96", "--batch", "8"]
    assert main([*args, "--json", str(tmp_path / "live.json")]) == 0
    assert "computed on the fly" in capsys.readouterr().out
    assert main([*args, "--repo", str(out / "compress" / "test"), "--json", str(tmp_path / "repo.json")]) == 0
    live, repo = (json.loads((tmp_path / f"{k}.json").read_text()) for k in ("live", "repo"))
    trained = json.loads((out / "teacher" / "metrics.json").read_text())["test"]
    for k in ("mAP50", "mAP50-95"):
        assert abs(live[k] - repo[k]) < 1e-3 and abs(repo[k] - trained[k]) < 1e-3, k


def test_teacher_val_without_its_ddpm_says_what_to_pass(micro_pipeline, tmp_path, capsys):
    _, out = micro_pipeline
    rc = main(["val", "--model", str(out / "teacher" / "best.pt"), "--data", str(out / "data" / "dataset"),
               "--split", "test", "--imgsz", "96", "--ddpm", str(tmp_path / "gone")])
    assert rc != 0 and "--ddpm" in capsys.readouterr().err


def test_a_copied_run_finds_its_ddpm_and_compressor(micro_pipeline, tmp_path):
    # the checkpoint records its runs relative to itself too: a run folder copied to another machine,
    # where the absolute paths do not exist, still finds them beside it
    from d3n.train.teacher.model import FusionTeacher
    from d3n.train.teacher.val import recorded_run

    _, out = micro_pipeline
    extra = FusionTeacher.load(out / "teacher" / "best.pt").extra
    for key, run in (("ddpm", "ddpm"), ("compressor", "resvae")):
        assert ((out / "teacher") / extra["relative"][key]).resolve() == (out / run).resolve()
        assert recorded_run(extra, key, out / "teacher" / "best.pt") == (out / run).resolve()
        for folder in (run, "teacher"):
            (tmp_path / "copy" / folder).mkdir(parents=True, exist_ok=True)
        moved = {key: str(tmp_path / "gone" / run), "relative": extra["relative"]}
        assert recorded_run(moved, key, tmp_path / "copy" / "teacher" / "best.pt") == (tmp_path / "copy" / run).resolve()
    # neither place exists: the recorded path, which the caller names in its error
    assert recorded_run({"ddpm": "/gone/ddpm"}, "ddpm", tmp_path / "x" / "best.pt") == Path("/gone/ddpm")
    assert recorded_run({"ddpm": None}, "ddpm", tmp_path / "best.pt") is None
