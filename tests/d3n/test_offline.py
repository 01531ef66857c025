"""Offline by design: a whole train → val → predict → export → DDPM run opens no socket to the network.

The commands run in a fresh subprocess with an empty home (no cached fonts or settings), with
every socket connect, UDP send and DNS lookup of a non-loopback address recorded and refused.
A control run proves the guard sees a real attempt, so the test can fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

GUARD = textwrap.dedent(
    """
    import ipaddress, json, socket, sys, traceback

    ATTEMPTS = []

    def _loopback(host):
        if isinstance(host, bytes):
            host = host.decode()
        if host in ("localhost", "", None):
            return True
        try:
            return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
        except ValueError:
            return False

    def _refuse(kind, target):
        ATTEMPTS.append({"kind": kind, "target": repr(target),
                         "stack": "".join(traceback.format_stack(limit=12))})
        raise OSError(f"d3n offline test: {kind} to {target!r} refused")

    _connect, _connect_ex, _sendto = socket.socket.connect, socket.socket.connect_ex, socket.socket.sendto
    _getaddrinfo = socket.getaddrinfo

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _loopback(address[0]):
            _refuse("connect", address)
        return _connect(self, address)

    def connect_ex(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _loopback(address[0]):
            _refuse("connect_ex", address)
        return _connect_ex(self, address)

    def sendto(self, data, *args):
        address = args[-1]
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _loopback(address[0]):
            _refuse("sendto", address)
        return _sendto(self, data, *args)

    def getaddrinfo(host, *args, **kwargs):
        if not _loopback(host):
            _refuse("getaddrinfo", host)
        return _getaddrinfo(host, *args, **kwargs)

    socket.socket.connect, socket.socket.connect_ex, socket.socket.sendto = connect, connect_ex, sendto
    socket.getaddrinfo = getaddrinfo

    def report(path):
        with open(path, "w") as f:
            json.dump(ATTEMPTS, f)
    """
)

WORKLOAD = textwrap.dedent(
    """
    from pathlib import Path
    from d3n.cli import main

    data, work = Path(sys.argv[1]), Path(sys.argv[2])
    try:
        run = work / "baseline"
        assert main(["train", "baseline", "--data", str(data), "--out", str(run), "--imgsz", "128",
                     "--epochs", "1", "--batch", "8", "--workers", "0"]) == 0
        assert main(["val", "--model", str(run / "best.pt"), "--data", str(data), "--imgsz", "128"]) == 0
        from d3n.offline import ultralytics
        YOLO = ultralytics().YOLO
        images = sorted((data / "images" / "val").iterdir())[:2]
        # save=True draws labels with a font: the font download path of ultralytics
        YOLO(str(run / "best.pt")).predict([str(p) for p in images], imgsz=128, save=True,
                                            project=str(work / "predict"), name="p", conf=0.0)
        assert main(["export", str(run / "best.pt"), "--format", "onnx", "--imgsz", "128",
                     "--out", str(work / "model.onnx"), "--calib", str(data)]) == 0
        assert main(["ddpm", "train", "--data", str(data), "--out", str(work / "ddpm"), "--preset",
                     "tiny", "--size", "16", "--steps", "2", "--batch", "4"]) == 0
    finally:
        report(work / "attempts.json")
    """
)

CONTROL = textwrap.dedent(
    """
    import urllib.request
    from pathlib import Path
    try:
        urllib.request.urlopen("http://example.com/", timeout=5)
    except OSError:
        pass
    report(Path(sys.argv[2]) / "attempts.json")
    """
)


def _run(script: str, data: Path, work: Path) -> list[dict]:
    work.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("YOLO_", "D3N_"))}
    env.update(HOME=str(work / "home"), D3N_HOME=str(work / "d3n-home"), MPLCONFIGDIR=str(work / "mpl"),
               OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, "-c", GUARD + script, str(data), str(work)], env=env,
                          cwd=work, capture_output=True, text=True, timeout=900)
    attempts = work / "attempts.json"
    assert attempts.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(attempts.read_text())


def test_guard_sees_a_network_attempt(synth_small, tmp_path):
    attempts = _run(CONTROL, synth_small, tmp_path)
    assert attempts and attempts[0]["kind"] in ("getaddrinfo", "connect")


def test_train_val_predict_export_ddpm_make_no_network_call(synth_small, tmp_path):
    attempts = _run(WORKLOAD, synth_small, tmp_path)
    assert attempts == [], "\n\n".join(f"{a['kind']} {a['target']}\n{a['stack']}" for a in attempts)
    # the work really happened, with a fresh home and no cached assets
    assert (tmp_path / "baseline" / "best.pt").exists()
    assert any((tmp_path / "predict" / "p").iterdir())
    assert (tmp_path / "model.onnx").exists()
