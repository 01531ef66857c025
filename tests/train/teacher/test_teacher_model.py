"""FusionTeacher: YOLOv5s + fusion at P3/P4/P5, ultralytics outputs/loss/NMS, init == detector, checkpoints."""

import copy

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from d3n.errors import ArtifactError
from d3n.offline import ultralytics
from d3n.train.teacher.fusion import FusionConfig
from d3n.train.teacher.model import LEVELS, FusionTeacher, TeacherConfig

NC, IMGSZ, B = 3, 64, 2
DDPM_CH = {"p3": 8, "p4": 12, "p5": 16}


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return FusionTeacher(TeacherConfig(nc=NC, ddpm_channels=DDPM_CH))


def _ddpm(sizes=(5, 3, 2)):
    """Random decoded DDPM features at sizes unlike the neck's (8/4/2 at 64 px): the teacher resizes."""
    torch.manual_seed(1)
    return {lvl: torch.randn(B, DDPM_CH[lvl], s, s + 1) for lvl, s in zip(LEVELS, sizes, strict=True)}


def _images():
    torch.manual_seed(2)
    return torch.rand(B, 3, IMGSZ, IMGSZ)


def _batch():
    return {"batch_idx": torch.tensor([0.0, 1.0, 1.0]), "cls": torch.tensor([[0.0], [2.0], [1.0]]),
            "bboxes": torch.tensor([[0.5, 0.5, 0.4, 0.3], [0.3, 0.6, 0.2, 0.2], [0.7, 0.3, 0.3, 0.4]])}


def _perturb(module):
    torch.manual_seed(3)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn_like(p))


@pytest.fixture(scope="module")
def plain():
    """A plain ultralytics DetectionModel of the same yaml and nc (weights loaded per test)."""
    ultralytics()
    from ultralytics.nn.tasks import DetectionModel

    return DetectionModel("yolov5s.yaml", nc=NC, verbose=False)


def test_train_mode_output_is_detection_models_raw_dict(teacher):
    teacher.train()
    out = teacher(_images(), _ddpm())
    n = sum((IMGSZ // s) ** 2 for s in (8, 16, 32))
    assert set(out) == {"boxes", "scores", "feats"}
    assert out["boxes"].shape == (B, 64, n) and out["scores"].shape == (B, NC, n)
    assert [f.shape[-1] for f in out["feats"]] == [8, 4, 2]


def test_eval_mode_output_decodes_and_goes_through_nms(teacher):
    ultralytics()
    from ultralytics.utils.nms import non_max_suppression

    teacher.eval()
    with torch.no_grad():
        y, raw = teacher(_images(), _ddpm())
    assert y.shape == (B, 4 + NC, raw["boxes"].shape[-1])
    dets = non_max_suppression(y, conf_thres=0.0, max_det=10)
    assert len(dets) == B and all(d.shape[1] == 6 for d in dets)


def test_teacher_at_init_equals_the_plain_detector(plain):
    fresh = FusionTeacher(TeacherConfig(nc=NC, ddpm_channels=DDPM_CH))
    plain.load_state_dict(fresh.detector_state_dict(), strict=True)
    x = _images()
    for train in (True, False):
        fresh.train(train)
        plain.train(train)
        with torch.no_grad():
            a, b = fresh(x, _ddpm()), plain(x)
        if not train:
            torch.testing.assert_close(a[0], b[0])
            a, b = a[1], b[1]
        torch.testing.assert_close(a["boxes"], b["boxes"])
        torch.testing.assert_close(a["scores"], b["scores"])


def test_ddpm_features_matter_once_fusion_is_trained(teacher):
    t = copy.deepcopy(teacher).eval()
    _perturb(t.fusions)
    with torch.no_grad():
        a = t(_images(), _ddpm())[0]
        b = t(_images(), {k: v + torch.randn_like(v) for k, v in _ddpm().items()})[0]
    assert (a - b).abs().max() > 1e-4


def test_loss_on_a_fake_batch_backpropagates_into_detector_and_fusion(teacher):
    t = copy.deepcopy(teacher).train()
    loss, items = t.loss(_batch(), t(_images(), _ddpm()))
    assert loss.shape == (3,) and torch.isfinite(loss).all() and loss.sum() > 0
    assert set(items) == {"box_loss", "cls_loss", "dfl_loss"}
    loss.sum().backward()
    assert t.detector.model[0].conv.weight.grad.abs().sum() > 0
    for lvl in LEVELS:  # zero-initialised output projection: it receives the first gradient
        assert t.fusions[lvl].out.weight.grad.abs().sum() > 0


def test_missing_level_is_a_clear_error(teacher):
    ddpm = _ddpm()
    del ddpm["p4"]
    with pytest.raises(ValueError, match="missing for levels"):
        teacher(_images(), ddpm)


def test_branch_weights_per_level_sum_to_one(teacher):
    w = teacher.branch_weights()
    assert set(w) == set(LEVELS)
    for v in w.values():
        assert len(v) == 3 and abs(sum(v) - 1.0) < 1e-6


def test_checkpoint_round_trip_keeps_config_and_outputs(tmp_path):
    cfg = TeacherConfig(nc=NC, ddpm_channels=DDPM_CH,
                        fusion=FusionConfig(mode="weighted_sum", use_filter=False, kv_size=8))
    t = FusionTeacher(cfg)
    _perturb(t.fusions)
    path = t.save(tmp_path / "teacher.pt", epoch=3, metrics={"mAP50": np.float32(0.5)}, data=tmp_path)
    loaded = FusionTeacher.load(path)
    assert loaded.config == cfg
    extra = torch.load(path, weights_only=True)["extra"]
    assert extra == {"epoch": 3, "metrics": {"mAP50": 0.5}, "data": str(tmp_path)}
    t.eval()
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(_images(), _ddpm())[0], t(_images(), _ddpm())[0])
    assert loaded.branch_weights() == t.branch_weights()


def test_detector_weights_export_into_a_plain_detection_model(teacher, plain):
    t = copy.deepcopy(teacher)
    _perturb(t.detector)
    plain.load_state_dict(t.detector_state_dict(), strict=True)
    want = t.detector.state_dict()
    got = plain.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert not any(k.startswith("fusions") for k in t.detector_state_dict())


def test_bad_checkpoints_raise_artifact_errors(tmp_path):
    with pytest.raises(ArtifactError, match="not found"):
        FusionTeacher.load(tmp_path / "none.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ArtifactError, match="junk.pt: not a readable"):
        FusionTeacher.load(junk)
    other = tmp_path / "other.pt"
    torch.save({"model": 1}, other)
    with pytest.raises(ArtifactError, match="not a d3n fusion-teacher checkpoint"):
        FusionTeacher.load(other)


def test_config_needs_all_three_levels():
    with pytest.raises(ValidationError, match="p3"):
        TeacherConfig(nc=NC, ddpm_channels={"p3": 8, "p4": 8})


def test_larger_ddpm_maps_are_averaged_onto_the_detector_grid():
    """A 64 px DDPM under a stride-8 level at 128 px: each detector cell gets the mean of the DDPM
    cells it covers (a fine checkerboard averages to 0.5 everywhere, where sampling would alias it to
    0s or 1s); smaller maps are interpolated; equal ones pass through."""
    from d3n.train.teacher.model import to_grid

    blocks = torch.arange(16.0).reshape(1, 1, 4, 4).repeat_interleave(2, -1).repeat_interleave(2, -2)
    assert torch.equal(to_grid(blocks, (4, 4)), torch.arange(16.0).reshape(1, 1, 4, 4))
    checker = (torch.arange(8)[:, None] + torch.arange(8)[None]) % 2
    assert torch.allclose(to_grid(checker[None, None].float(), (4, 4)), torch.full((1, 1, 4, 4), 0.5))
    small = torch.rand(1, 2, 3, 3)
    assert to_grid(small, (6, 6)).shape == (1, 2, 6, 6) and to_grid(small, (3, 3)) is small
