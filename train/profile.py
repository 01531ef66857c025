"""Model size and cost: parameter count and FLOPs counted by fvcore (issue: params and GFLOPs).

fvcore counts one fused multiply-add as one flop; ultralytics/thop-style "GFLOPs" count it as
two. Both are reported so the numbers line up with either convention.
"""

from __future__ import annotations

import copy
import logging

import torch


def count_params(model: torch.nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def fvcore_gmacs(model: torch.nn.Module, imgsz: int) -> float:
    from fvcore.nn import FlopCountAnalysis

    m = copy.deepcopy(model).float().cpu().eval()
    x = torch.zeros(1, 3, imgsz, imgsz)
    logging.getLogger("fvcore").setLevel(logging.ERROR)
    with torch.no_grad():
        fca = FlopCountAnalysis(m, x)
        fca.unsupported_ops_warnings(False)
        fca.uncalled_modules_warnings(False)
        return fca.total() / 1e9


def complexity(model: torch.nn.Module, imgsz: int) -> dict:
    gmacs = fvcore_gmacs(model, imgsz)
    gmacs640 = gmacs if imgsz == 640 else fvcore_gmacs(model, 640)
    return {"params": count_params(model), "fvcore_gflops": round(gmacs, 4),
            "gflops": round(2 * gmacs, 4), "gflops_at_640": round(2 * gmacs640, 3), "flops_imgsz": imgsz}
