"""Distillation loss (Eqs. 6-7 on the anchor-free head): zero at equality, o^T weighting, gradients."""

import pytest
import torch

from d3n.distill.loss import DistillConfig, DistillLoss, head_outputs
from d3n.offline import ultralytics

B, NC, N, REG = 2, 3, 10, 16


def _preds(seed=0, scores=None, boxes=None, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    boxes = torch.randn(B, 4 * REG, N, generator=g) if boxes is None else boxes.clone()
    scores = torch.randn(B, NC, N, generator=g) if scores is None else scores.clone()
    boxes.requires_grad_(requires_grad)
    scores.requires_grad_(requires_grad)
    return {"boxes": boxes, "scores": scores, "feats": [torch.zeros(B, 8, 2, 5)]}


def _as_maps(p):
    """The older list-of-maps head format: one (B, 4*reg_max + nc, h, w) map per level."""
    flat = torch.cat([p["boxes"], p["scores"]], dim=1)
    return [flat[..., :6].reshape(B, -1, 2, 3), flat[..., 6:].reshape(B, -1, 2, 2)]


@pytest.mark.parametrize("form", ["dict", "eval_tuple", "one2many", "maps"])
def test_zero_when_student_equals_teacher(form):
    p = _preds()
    wrap = {"dict": lambda x: x, "eval_tuple": lambda x: (torch.zeros(1), x),
            "one2many": lambda x: {"one2many": x, "one2one": x}, "maps": _as_maps}[form]
    loss, items = DistillLoss()(wrap(p), wrap(_preds()))
    assert loss.item() == 0.0
    assert all(v.item() == 0.0 for v in items.values())
    loss2, _ = DistillLoss()(wrap(_preds(seed=1)), wrap(p))
    assert loss2.item() > 0


def test_list_of_maps_matches_dict_form():
    s, t = _preds(0), _preds(1)
    a, _ = DistillLoss()(s, t)
    b, _ = DistillLoss()(_as_maps(s), _as_maps(t))
    torch.testing.assert_close(a, b)


def test_background_is_ignored_by_class_and_box_terms_but_not_objectness():
    """Teacher sure it is background (o^T ~ 0): class/box disagreement costs ~nothing; a student that
    sees a defect there still pays the objectness term."""
    t = _preds(scores=torch.full((B, NC, N), -30.0))
    s = _preds(seed=5, scores=torch.full((B, NC, N), -30.0) + 3.0 * torch.randn(B, NC, N))
    s["scores"][:, 0, :] = 3.0  # the student claims class 0 everywhere
    _, items = DistillLoss()(s, t)
    assert items["distill_cls"] < 1e-9 and items["distill_box"] < 1e-9
    assert items["distill_obj"] > 1.0


@pytest.mark.parametrize("terms", ["kl", "l2"])
def test_foreground_disagreement_is_penalised(terms):
    t = _preds(scores=torch.full((B, NC, N), 1.0))
    s = _preds(seed=5, scores=torch.full((B, NC, N), 1.0) + torch.randn(B, NC, N))
    _, items = DistillLoss(DistillConfig(terms=terms))(s, t)
    assert items["distill_cls"] > 1e-2 and items["distill_box"] > 1e-2


def _decoded_sides(boxes):
    """Expected DFL bin per side (what the head decodes into a box edge), (B, N, 4)."""
    d = boxes.transpose(1, 2).reshape(B, N, 4, REG).softmax(-1)
    return (d * torch.arange(REG, dtype=d.dtype)).sum(-1)


@pytest.mark.parametrize("term", ["obj", "cls", "box"])
@pytest.mark.parametrize("terms", ["kl", "l2"])
def test_each_term_moves_the_student_towards_the_teacher(term, terms):
    """Gradient descent on one term alone brings what that term compares closer to the teacher's:
    objectness = top class probability, class = class probabilities, box = decoded box sides."""
    t = _preds(seed=1, scores=2.0 * torch.randn(B, NC, N, generator=torch.Generator().manual_seed(3)))
    s = _preds(seed=2, requires_grad=True)
    gains = {f"{k}_gain": float(k == term) for k in ("obj", "cls", "box")}
    loss_fn = DistillLoss(DistillConfig(terms=terms, **gains))
    measure = {"obj": lambda p: p["scores"].sigmoid().amax(1), "cls": lambda p: p["scores"].sigmoid(),
               "box": lambda p: _decoded_sides(p["boxes"])}[term]
    before = (measure(s) - measure(t)).abs().mean().item()
    opt = torch.optim.Adam([s["boxes"], s["scores"]], lr=0.05)  # scale-free: terms are means of different sizes
    for _ in range(60):
        opt.zero_grad()
        loss, items = loss_fn(s, t)
        loss.backward()
        opt.step()
    after = (measure(s) - measure(t)).abs().mean().item()
    assert after < 0.7 * before, (before, after)
    untouched = {"obj", "cls", "box"} - {term}
    assert all(items[f"distill_{k}"] >= 0 for k in untouched)


def test_class_and_box_terms_are_proportional_to_teacher_objectness():
    base = torch.full((B, NC, N), -10.0)
    delta = torch.zeros(B, 4 * REG, N)
    delta[0, :, 3] = 1.0  # the student's boxes differ at one location only
    cls_delta = torch.zeros(B, NC, N)
    cls_delta[0, 1, 3] = -0.5  # below the max there, so the objectness term stays zero
    terms = {}
    for logit in (-2.0, 0.0, 2.0):
        scores = base.clone()
        scores[0, 0, 3] = logit  # the teacher's max class logit at that location -> o^T
        t = _preds(scores=scores)
        s = _preds(scores=scores + cls_delta, boxes=t["boxes"] + delta)
        _, items = DistillLoss()(s, t)
        assert items["distill_obj"] == 0
        terms[logit] = (items["distill_box"], items["distill_cls"], torch.sigmoid(torch.tensor(logit)))
    for logit in (-2.0, 2.0):
        box, cls, o = terms[logit]
        box0, cls0, o0 = terms[0.0]
        torch.testing.assert_close(box / box0, o / o0)
        torch.testing.assert_close(cls / cls0, o / o0)


def test_gradient_reaches_the_student_only():
    s = _preds(seed=0, requires_grad=True)
    t = _preds(seed=1, requires_grad=True)
    loss, _ = DistillLoss()(s, t)
    loss.backward()
    assert s["boxes"].grad.abs().sum() > 0 and s["scores"].grad.abs().sum() > 0
    assert t["boxes"].grad is None and t["scores"].grad is None


def test_lambda_batch_and_gt_loss_scaling():
    s, t = _preds(0), _preds(1)
    one, items = DistillLoss(DistillConfig(weight=1.0))(s, t)
    half, _ = DistillLoss()(s, t)  # default lambda = 0.5 (public YOLOv5 distillation)
    torch.testing.assert_close(half, 0.5 * one)
    expect = B * (items["distill_obj"] + items["distill_cls"] + items["distill_box"])
    torch.testing.assert_close(one, expect)
    gt = torch.tensor([1.0, 2.0, 3.0])
    total, items = DistillLoss()(s, t, gt_loss=gt)
    torch.testing.assert_close(total, half + 6.0)
    assert items["gt"] == 6.0


def test_temperature_acts_on_kl_terms_and_cancels_in_l2():
    """The paper's T on an L2 of logits cancels exactly (kept as the `l2` ablation); on the KL terms
    it softens the targets and changes the loss."""
    s, t = _preds(0), _preds(1)
    a, ia = DistillLoss(DistillConfig(temperature=1.0, box_temperature=1.0))(s, t)
    b, ib = DistillLoss(DistillConfig(temperature=4.0, box_temperature=4.0))(s, t)
    assert abs(ia["distill_cls"] - ib["distill_cls"]) > 1e-3 and abs(ia["distill_box"] - ib["distill_box"]) > 1e-3
    a, _ = DistillLoss(DistillConfig(terms="l2", temperature=1.0))(s, t)
    b, _ = DistillLoss(DistillConfig(terms="l2", temperature=20.0))(s, t)
    torch.testing.assert_close(a, b)


def test_box_term_ignores_a_shift_of_all_bin_logits():
    """A softmax is shift-invariant: adding a constant to one side's bin logits changes no decoded box,
    so the KL box term does not charge for it (the logit L2 does)."""
    t = _preds(1, scores=torch.full((B, NC, N), 3.0))
    s = _preds(1, scores=torch.full((B, NC, N), 3.0))
    s["boxes"] = s["boxes"] + 2.5
    _, kl = DistillLoss()(s, t)
    _, l2 = DistillLoss(DistillConfig(terms="l2"))(s, t)
    assert kl["distill_box"] < 1e-6 and l2["distill_box"] > 1.0


def test_mismatched_heads_and_unknown_formats_are_clear_errors():
    s = _preds()
    t = {"boxes": torch.zeros(B, 4 * REG, N + 1), "scores": torch.zeros(B, NC, N + 1)}
    with pytest.raises(ValueError, match="student and teacher heads differ"):
        DistillLoss()(s, t)
    with pytest.raises(ValueError, match="unsupported detector output"):
        head_outputs("boxes", REG)
    with pytest.raises(ValueError, match="lacks 'boxes'"):
        head_outputs({"feats": []}, REG)


def test_real_ultralytics_head_outputs():
    """The training-mode output of a plain ultralytics YOLOv5s feeds the loss directly."""
    ultralytics()
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    student = DetectionModel("yolov5s.yaml", nc=NC, verbose=False).train()
    x = torch.rand(1, 3, 64, 64)
    preds = student(x)
    teacher = {k: (v.detach() if torch.is_tensor(v) else v) for k, v in preds.items()}
    loss, _ = DistillLoss()(preds, teacher)
    assert loss.item() == 0.0
    teacher["scores"] = teacher["scores"] + 1.0
    loss, items = DistillLoss()(preds, teacher)
    assert loss.item() > 0 and items["distill_obj"] > 0
    loss.backward()
    assert student.model[-1].cv3[0][-1].weight.grad.abs().sum() > 0
