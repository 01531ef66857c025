"""`d3n teacher train --fusion/--fusion-off`: the paper's ablations (Tables I-III) by one flag."""

from __future__ import annotations

from d3n.cli import main
from d3n.config import validate
from d3n.train.cli import fusion_overrides
from d3n.train.teacher.fusion import FusionConfig


def test_fusion_off_switches_each_named_part_and_nothing_else():
    cfg = validate(FusionConfig, fusion_overrides(None, "filter, self_d"), "test")
    assert (cfg.use_filter, cfg.use_self_d) == (False, False)
    assert cfg.mode == "dynamic" and cfg.use_cross and cfg.use_self_x and cfg.residual and cfg.norm
    assert validate(FusionConfig, fusion_overrides("concat", ""), "test").mode == "concat"


def test_unknown_fusion_part_is_a_clear_error(tmp_path, capsys):
    rc = main(["teacher", "train", "--data", str(tmp_path), "--repo", str(tmp_path), "--val-repo", str(tmp_path),
               "--out", str(tmp_path / "run"), "--fusion-off", "filter,attention"])
    assert rc != 0
    err = capsys.readouterr().err
    assert "--fusion-off" in err and "attention" in err and "self_x" in err
    assert not (tmp_path / "run").exists()
