"""Keep ultralytics offline: no font, weight or package downloads, no update checks, no telemetry.

Call `configure_ultralytics()` before the first `import ultralytics` (its environment flags are
read at import time). Every d3n entry point that uses ultralytics goes through `ultralytics()`
below, so nothing reaches the network at run time:

- `YOLO_OFFLINE=1`: ultralytics' online check answers False without a DNS lookup;
- `YOLO_AUTOINSTALL=False`: no `pip install` of missing requirements at run time;
- settings `sync=False` (no telemetry/events), hub/integrations off;
- fonts: plots want Arial.ttf from a download; we place matplotlib's bundled DejaVu Sans under
  that name in a d3n-owned config dir, so plots render with a local font;
- AMP: ultralytics checks AMP by downloading a reference model; on CUDA we trust AMP (the known
  bad GPUs are still excluded), on CPU AMP is off anyway.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

_CONFIGURED = False
FONT_NAMES = ("Arial.ttf", "Arial.Unicode.ttf")


def config_dir() -> Path:
    """d3n's own ultralytics config dir, so a user's global ultralytics settings stay untouched."""
    root = os.environ.get("D3N_HOME") or Path.home() / ".cache" / "d3n"
    return Path(root) / "ultralytics"


def _install_fonts(target: Path) -> None:
    import matplotlib

    src = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    target.mkdir(parents=True, exist_ok=True)
    for name in FONT_NAMES:
        dst = target / name
        if not dst.exists():
            shutil.copyfile(src, dst)


def configure_ultralytics() -> None:
    """Set ultralytics' offline switches and local assets. Idempotent."""
    global _CONFIGURED
    if _CONFIGURED:
        return
    cfg = config_dir()
    os.environ.setdefault("YOLO_CONFIG_DIR", str(cfg.parent / "yolo-config"))
    os.environ["YOLO_OFFLINE"] = "1"
    os.environ["YOLO_AUTOINSTALL"] = "False"
    os.environ.setdefault("YOLO_VERBOSE", "True")
    # ultralytics looks for fonts in <YOLO_CONFIG_DIR>/Ultralytics
    _install_fonts(Path(os.environ["YOLO_CONFIG_DIR"]) / "Ultralytics")

    from ultralytics.utils import SETTINGS

    # Only keys this ultralytics version knows; all integrations off.
    off = ("sync", "hub", "clearml", "comet", "dvc", "mlflow", "neptune", "raytune", "tensorboard",
           "wandb", "vscode_msg", "openvino_msg")
    SETTINGS.update({k: False for k in off if k in SETTINGS})
    _patch_amp_check()
    _CONFIGURED = True


def _patch_amp_check() -> None:
    import re

    import ultralytics.engine.trainer as trainer

    bad = re.compile(r"(nvidia|geforce|quadro|tesla).*?(1660|1650|1630|t400|t550|t600|t1000|t1200|t2000|k40m)",
                     re.IGNORECASE)

    def local_check_amp(model) -> bool:
        import torch

        device = next(model.parameters()).device
        if device.type != "cuda":
            return False
        return not bad.search(torch.cuda.get_device_name(device))

    trainer.check_amp = local_check_amp


def ultralytics():
    """Import ultralytics with the offline configuration applied; returns the module."""
    configure_ultralytics()
    import ultralytics as ul

    return ul
