"""Distillation loss, paper Eqs. 6-7, on ultralytics' anchor-free YOLOv5s head (§III-D, Fig. 7).

Eq. 7 was written for the anchor-based YOLOv5 head with an objectness output. The ultralytics
`yolov5s.yaml` head has none: per location it predicts box distribution logits (4 sides x reg_max
DFL bins) and independent class logits (nc sigmoids). The mapping (docs/design.md, "Eq. 7 on the
anchor-free head"), in the default `terms: kl`:

- o^T := the teacher's objectness stand-in, its top class probability max_c sigmoid(t_c);
- objectness term (every location, unscaled): the Bernoulli KL between the teacher's and the
  student's top class probability, so the student learns *where* the teacher sees a defect;
- class term (scaled by o^T, background ignored): per class, the Bernoulli KL between
  sigmoid(t_c / T) and sigmoid(s_c / T), times T^2. T softens the targets and acts (at T -> inf
  it tends to the logit L2 / 8, at T = 1 it is the plain KL of the two heads' probabilities);
- box term (scaled by o^T): per side, the KL between the teacher's and the student's DFL bin
  distributions, softmax(logits / T_box), times T_box^2 (localisation distillation). A softmax is
  shift-invariant, so this compares what the head decodes, not its raw logits.

Every term is zero when the student equals the teacher and pulls the student towards it
otherwise. `terms: l2` keeps the paper's literal reading for ablation: L2 between logits (the
max-class logit for objectness, class logits, DFL logits); there the temperature cancels and the
box L2 over-constrains the softmax-invariant logits.

Each term is a mean over locations (and classes / sides); the sum, times lambda and the batch size
(as ultralytics' detection loss), is added to the student's ground-truth loss. The teacher's
outputs are detached: gradients reach the student only.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from d3n.config import StrictModel


class DistillConfig(StrictModel):
    weight: float = Field(0.5, ge=0)  # lambda in Eq. 7; 0.5 = distill_ratio of public YOLOv5 distillation
    terms: Literal["kl", "l2"] = "kl"  # kl: each term respects its head's probabilities; l2: the paper's logit L2
    temperature: float = Field(1.0, gt=0)  # class term softening (kl); cancels in l2 (paper: T = 20 on an L2)
    box_temperature: float = Field(1.0, gt=0)  # DFL distribution softening (kl)
    obj_gain: float = Field(1.0, ge=0)
    cls_gain: float = Field(1.0, ge=0)
    box_gain: float = Field(1.0, ge=0)
    reg_max: int = Field(16, ge=1)  # DFL bins of the head


def head_outputs(preds: Any, reg_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(boxes (B, N, 4*reg_max), scores (B, N, nc)) from any ultralytics Detect output.

    Accepts the training dict {"boxes", "scores", "feats"} of ultralytics 8.4, its end-to-end form
    {"one2many": ..., "one2one": ...} (one2many is used, as its loss does), the eval tuple
    (decoded, raw dict), and the older list of per-level maps (B, 4*reg_max + nc, h, w).
    """
    if isinstance(preds, tuple) and len(preds) == 2 and isinstance(preds[1], (dict, list)):
        preds = preds[1]
    if isinstance(preds, dict) and "one2many" in preds:
        preds = preds["one2many"]
    if isinstance(preds, dict):
        if "boxes" not in preds or "scores" not in preds:
            raise ValueError(f"detector output dict lacks 'boxes'/'scores' (keys: {sorted(preds)})")
        return preds["boxes"].transpose(1, 2), preds["scores"].transpose(1, 2)
    if isinstance(preds, (list, tuple)) and preds and all(torch.is_tensor(p) and p.ndim == 4 for p in preds):
        flat = torch.cat([p.flatten(2) for p in preds], dim=2).transpose(1, 2)  # (B, N, no)
        nb = 4 * reg_max
        if flat.shape[2] <= nb:
            raise ValueError(f"per-level maps have {flat.shape[2]} channels, need 4*reg_max={nb} + nc")
        return flat[..., :nb], flat[..., nb:]
    raise ValueError(f"unsupported detector output: {type(preds).__name__}")


def bernoulli_kl(t_logit: torch.Tensor, s_logit: torch.Tensor) -> torch.Tensor:
    """KL(Bern(sigmoid(t)) || Bern(sigmoid(s))) elementwise, from logits (log-sigmoids are stable and
    the difference is exactly zero where the two agree)."""
    ls = F.logsigmoid
    return torch.sigmoid(t_logit) * (ls(t_logit) - ls(s_logit)) + torch.sigmoid(-t_logit) * (ls(-t_logit) - ls(-s_logit))


def softmax_kl(t_logit: torch.Tensor, s_logit: torch.Tensor) -> torch.Tensor:
    """KL(softmax(t) || softmax(s)) over the last axis."""
    t_log = F.log_softmax(t_logit, -1)
    return (t_log.exp() * (t_log - F.log_softmax(s_logit, -1))).sum(-1)


class DistillLoss:
    def __init__(self, config: DistillConfig | None = None):
        self.config = config or DistillConfig()

    def terms(self, s_box, s_cls, t_box, t_cls) -> dict[str, torch.Tensor]:
        """The three per-term means (objectness, class, box), before gains and lambda."""
        cfg = self.config
        o_t = torch.sigmoid(t_cls.amax(-1))  # o^T (docs/design.md), (B, N)
        if cfg.terms == "l2":
            return {"obj": (s_cls.amax(-1) - t_cls.amax(-1)).pow(2).mean(),
                    "cls": ((s_cls - t_cls).pow(2) * o_t[..., None]).mean(),
                    "box": ((s_box - t_box).pow(2) * o_t[..., None]).mean()}
        T, Tb = cfg.temperature, cfg.box_temperature
        obj = bernoulli_kl(t_cls.amax(-1), s_cls.amax(-1)).mean()
        cls = (bernoulli_kl(t_cls / T, s_cls / T) * T**2 * o_t[..., None]).mean()
        sides = s_box.shape[:-1] + (4, s_box.shape[-1] // 4)  # (B, N, 4, reg_max): one distribution per side
        box_kl = softmax_kl(t_box.reshape(sides) / Tb, s_box.reshape(sides) / Tb) * Tb**2  # (B, N, 4)
        box = (box_kl * o_t[..., None]).mean()
        return {"obj": obj, "cls": cls, "box": box}

    def __call__(self, student_preds: Any, teacher_preds: Any,
                 gt_loss: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg = self.config
        s_box, s_cls = head_outputs(student_preds, cfg.reg_max)
        t_box, t_cls = (v.detach() for v in head_outputs(teacher_preds, cfg.reg_max))
        if s_box.shape != t_box.shape or s_cls.shape != t_cls.shape:
            raise ValueError(f"student and teacher heads differ: boxes {tuple(s_box.shape)} vs "
                             f"{tuple(t_box.shape)}, scores {tuple(s_cls.shape)} vs {tuple(t_cls.shape)}")
        t = self.terms(s_box.float(), s_cls.float(), t_box.float(), t_cls.float())
        total = cfg.obj_gain * t["obj"] + cfg.cls_gain * t["cls"] + cfg.box_gain * t["box"]
        loss = cfg.weight * total * s_cls.shape[0]  # x batch size, as ultralytics' detection loss
        items = {f"distill_{k}": v.detach() for k, v in t.items()} | {"distill": loss.detach()}
        if gt_loss is not None:
            gt = gt_loss.sum()
            items["gt"] = gt.detach()
            loss = gt + loss
        return loss, items
