"""Distillation loss, paper Eqs. 6-7, on ultralytics' anchor-free YOLOv5s head (§III-D, Fig. 7).

Eq. 7 was written for the anchor-based YOLOv5 head with an objectness output. The ultralytics
`yolov5s.yaml` head has none: per location it predicts box distribution logits (4 * reg_max,
DFL) and class logits (nc). The mapping (DESIGN.md "Mapping"):

- o^T := the teacher's maximum class probability per location, max_c sigmoid(teacher logit_c);
- objectness term (always, unscaled): L2 between the student's and the teacher's max-class
  logits, i.e. the anchor-free stand-in for the objectness logit;
- class term: L2 between the class logits, each location scaled by o^T (background ignored);
- box term: L2 between the box distribution logits, each location scaled by o^T.

Following the public YOLOv5 output-distillation practice (`compute_distillation_output_loss`:
MSE per output, teacher-objectness scaling, T = 20, `distill_ratio` = 0.5, total multiplied by
the batch size like the detection loss), each term is a plain mean over its elements.

Temperature (paper: L2, T = 20): logits are divided by T and the L2 is multiplied by T^2, the
usual factor that keeps gradient magnitudes independent of T. For an L2 on logits the two cancel
exactly, so T changes nothing here (softening only matters for a softmax/KL loss); the factor is
kept explicit so the paper's setting reads off the code and the config.

The teacher's outputs are detached: gradients reach the student only. This module returns
lambda x (distillation terms); the trainer adds it to the student's ground-truth loss
(Eq. 7's loss(gt, s) parts), or passes `gt_loss` to get the sum.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from d3n.config import StrictModel


class DistillConfig(StrictModel):
    weight: float = Field(0.5, ge=0)  # lambda in Eq. 7; 0.5 = distill_ratio of public YOLOv5 distillation
    temperature: float = Field(20.0, gt=0)  # paper §IV-A: L2 logit distillation, T = 20
    obj_gain: float = Field(1.0, ge=0)
    cls_gain: float = Field(1.0, ge=0)
    box_gain: float = Field(1.0, ge=0)
    reg_max: int = Field(16, ge=1)  # DFL bins of the head; only needed to split list-of-maps outputs


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


class DistillLoss:
    def __init__(self, config: DistillConfig | None = None):
        self.config = config or DistillConfig()

    def _l2(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Squared difference of temperature-scaled logits, times T^2 (see module docstring)."""
        temp = self.config.temperature
        return (s / temp - t / temp).pow(2) * temp**2

    def __call__(self, student_preds: Any, teacher_preds: Any,
                 gt_loss: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg = self.config
        s_box, s_cls = head_outputs(student_preds, cfg.reg_max)
        t_box, t_cls = (v.detach() for v in head_outputs(teacher_preds, cfg.reg_max))
        if s_box.shape != t_box.shape or s_cls.shape != t_cls.shape:
            raise ValueError(f"student and teacher heads differ: boxes {tuple(s_box.shape)} vs "
                             f"{tuple(t_box.shape)}, scores {tuple(s_cls.shape)} vs {tuple(t_cls.shape)}")
        t_max = t_cls.float().amax(-1)  # (B, N) teacher's max-class logit
        o_t = torch.sigmoid(t_max)  # o^T (DESIGN.md mapping)
        obj = self._l2(s_cls.float().amax(-1), t_max).mean()
        cls = (self._l2(s_cls.float(), t_cls.float()) * o_t[..., None]).mean()
        box = (self._l2(s_box.float(), t_box.float()) * o_t[..., None]).mean()
        terms = cfg.obj_gain * obj + cfg.cls_gain * cls + cfg.box_gain * box
        loss = cfg.weight * terms * s_cls.shape[0]  # x batch size, as ultralytics' detection loss
        items = {"distill_obj": obj.detach(), "distill_cls": cls.detach(), "distill_box": box.detach(),
                 "distill": loss.detach()}
        if gt_loss is not None:
            gt = gt_loss.sum()
            items["gt"] = gt.detach()
            loss = gt + loss
        return loss, items
