"""The optimiser a run trains with is the one its config names, and `auto` says what it became."""

from pathlib import Path

import torch

from d3n.pipeline import load_config
from d3n.train.detector import model as detector
from d3n.train.detector.loop import TrainConfig, build_optimizer

ROOT = Path(__file__).resolve().parents[3]


def test_paper_config_trains_with_sgd_at_lr_0_01():
    cfg = load_config(ROOT / "configs" / "neu-det.yaml").train
    opt, info = build_optimizer(detector.build(6, list("abcdef")), cfg, nc=6, iterations=7500)
    assert isinstance(opt, torch.optim.SGD)
    assert {g["lr"] for g in opt.param_groups} == {0.01}
    assert {g["momentum"] for g in opt.param_groups} == {0.937}
    assert info == {"name": "SGD", "lr0": 0.01, "momentum": 0.937, "weight_decay": 0.0005, "from": "config"}


def test_auto_says_what_it_resolved_to():
    """ultralytics' rule: a short run gets AdamW at a fitted lr, whatever lr0 says."""
    model = detector.build(6, list("abcdef"))
    opt, info = build_optimizer(model, TrainConfig(optimizer="auto", lr0=0.01), nc=6, iterations=228)
    assert isinstance(opt, torch.optim.AdamW) and info["name"] == "AdamW"
    assert {g["lr"] for g in opt.param_groups} == {0.001} and info["lr0"] == 0.001
    assert info["from"].startswith("auto")
    opt, info = build_optimizer(model, TrainConfig(optimizer="auto"), nc=6, iterations=20000)
    assert isinstance(opt, torch.optim.SGD) and info["lr0"] == 0.01


def test_cpu_config_names_what_auto_gave_the_earlier_runs():
    cfg = load_config(ROOT / "configs" / "neu-det-cpu.yaml").train
    explicit = build_optimizer(detector.build(6, list("abcdef")), cfg, nc=6, iterations=228)[1]
    auto = build_optimizer(detector.build(6, list("abcdef")), cfg.model_copy(update={"optimizer": "auto"}),
                           nc=6, iterations=228)[1]
    assert {k: explicit[k] for k in ("name", "lr0", "momentum")} == {k: auto[k] for k in ("name", "lr0", "momentum")}
