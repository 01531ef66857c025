"""The self-distillation control: a fresh student distilled from the trained baseline, no DDPM."""

from __future__ import annotations

import json

from d3n.cli import main


def test_student_distilled_from_the_baseline(micro_pipeline, tmp_path):
    _, out = micro_pipeline
    run = tmp_path / "self"
    rc = main(["distill", "--baseline", str(out / "baseline" / "best.pt"), "--data", str(out / "data" / "dataset"),
               "--repo", str(out / "compress" / "train"), "--out", str(run), "--imgsz", "96", "--epochs", "1",
               "--batch", "8", "--workers", "0"])
    assert rc == 0
    m = json.loads((run / "metrics.json").read_text())
    assert m["teacher"]["checkpoint"].endswith("baseline/best.pt")
    assert m["same_params_and_flops_as_baseline"] is True
    assert "distill_cls" in (run / "results.csv").read_text()


def test_distill_needs_exactly_one_teacher(micro_pipeline, tmp_path, capsys):
    _, out = micro_pipeline
    rc = main(["distill", "--data", str(out / "data" / "dataset"), "--repo", str(out / "compress" / "train"),
               "--out", str(tmp_path / "x")])
    assert rc != 0 and "exactly one of --teacher" in capsys.readouterr().err
