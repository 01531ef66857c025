"""Model size and cost: parameter count and FLOPs counted by fvcore.

fvcore counts one fused multiply-add as one flop; ultralytics/thop-style "GFLOPs" count it as
two. Both are reported so the numbers line up with either convention.
"""

from __future__ import annotations

import copy
import logging

import torch


def count_params(model: torch.nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def fvcore_gmacs(model: torch.nn.Module, imgsz: int, extra: tuple = ()) -> float:
    """fvcore's count for one image; `extra` are further forward inputs (the teacher's features)."""
    from fvcore.nn import FlopCountAnalysis

    m = copy.deepcopy(model).float().cpu().eval()
    x = (torch.zeros(1, 3, imgsz, imgsz), *extra)
    logging.getLogger("fvcore").setLevel(logging.ERROR)
    with torch.no_grad():
        fca = FlopCountAnalysis(m, x if extra else x[0])
        fca.unsupported_ops_warnings(False)
        fca.uncalled_modules_warnings(False)
        return fca.total() / 1e9


def complexity(model: torch.nn.Module, imgsz: int) -> dict:
    gmacs = fvcore_gmacs(model, imgsz)
    gmacs640 = gmacs if imgsz == 640 else fvcore_gmacs(model, 640)
    return {"params": count_params(model), "fvcore_gflops": round(gmacs, 4),
            "gflops": round(2 * gmacs, 4), "gflops_at_640": round(2 * gmacs640, 3), "flops_imgsz": imgsz}


def teacher_complexity(model: torch.nn.Module, imgsz: int, channels: dict[str, int]) -> dict:
    """The fusion teacher's cost given decoded DDPM features at P3/P4/P5 (strides 8/16/32).

    Not counted: decoding the latents (ResVAE decoder) and the FFT of the noise filter, which
    fvcore has no formula for; the teacher runs on servers only, so this is for the report."""
    feats = {lv: torch.zeros(1, c, imgsz // s, imgsz // s)
             for (lv, c), s in zip(sorted(channels.items()), (8, 16, 32), strict=True)}
    gmacs = fvcore_gmacs(model, imgsz, (feats,))
    return {"gflops": round(2 * gmacs, 4), "fvcore_gflops": round(gmacs, 4), "flops_imgsz": imgsz}
