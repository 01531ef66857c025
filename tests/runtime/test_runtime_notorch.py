"""The runtime never imports torch (nor ultralytics or the training side), and Ctrl-C/SIGTERM
stop `d3n run` cleanly with every sink flushed."""

from __future__ import annotations

import json
import pkgutil
import signal
import subprocess
import time
from pathlib import Path

from conftest import make_frame, python_with_blocked

import d3n.runtime

FORBIDDEN = ["torch", "torchvision", "ultralytics", "d3n.train", "d3n.distill", "d3n.export"]


def runtime_modules() -> list[str]:
    names = [m.name for m in pkgutil.iter_modules(d3n.runtime.__path__, "d3n.runtime.")]
    assert {"d3n.runtime.pipeline", "d3n.runtime.cli", "d3n.runtime.trt_backend"} <= set(names)
    return names


def test_every_runtime_module_imports_without_torch():
    code = ("import importlib\n"
            f"for m in {runtime_modules()!r}: importlib.import_module(m)\n"
            f"bad = [m for m in sys.modules if any(m == f or m.startswith(f + '.') for f in {FORBIDDEN!r})]\n"
            "assert not bad, bad\nprint('ok')\n")
    proc = subprocess.run(python_with_blocked(FORBIDDEN, code), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_d3n_run_never_imports_torch_and_stops_cleanly_on_sigterm(tiny_onnx, tmp_path):
    """The real console entry point (with every command group registered) on an endless-ish
    source; torch imports raise, and SIGTERM ends the run with exit 0 and a complete JSONL."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    import cv2

    for i in range(200):
        cv2.imwrite(str(folder / f"{i:04d}.png"), make_frame(i, 96, 64))
    out = tmp_path / "det.jsonl"
    code = ("import atexit\n"
            "atexit.register(lambda: print('TORCH_LOADED' if 'torch' in sys.modules else 'NO_TORCH', "
            "file=sys.stderr))\n"
            "from d3n.cli import main\n"
            f"sys.exit(main(['run', '--model', {str(tiny_onnx)!r}, '--source', {str(folder)!r}, "
            f"'--sink', 'jsonl:{out}', '--max-fps', '5']))\n")
    proc = subprocess.Popen(python_with_blocked(["torch", "ultralytics"], code),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and len(out.read_text().splitlines()) >= 3:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1]
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert "NO_TORCH" in stderr and "blocked import" not in stderr
    assert "SIGTERM" in stderr
    rows = [json.loads(line) for line in Path(out).read_text().splitlines()]  # no torn last line
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["stopped_by"] == "stop requested"
    assert 3 <= len(rows) == summary["frames"] < 200
