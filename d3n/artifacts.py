"""Run folders and artifacts: atomic writes, hashes and the stage manifest.

Every stage writes one run folder holding its weights, `config.yaml` (the resolved config it ran
with), `metrics.json`, plots and `manifest.json`. A file is written under a temporary name and
renamed into place, so a crash never leaves a half-written artifact that looks finished. The
manifest is written last, with `complete: true`, and records the inputs' fingerprints so that
`d3n pipeline` can skip a stage whose inputs did not change.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from d3n import __version__
from d3n.distributed import check_writer
from d3n.errors import ArtifactError

MANIFEST = "manifest.json"
METRICS = "metrics.json"
CONFIG = "config.yaml"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    check_writer(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a hidden temporary folder beside `path`; it replaces `path` only if the block succeeds,
    so a killed import or generation never leaves a half-written dataset that looks finished."""
    path = Path(path)
    check_writer(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def _jsonable(obj: Any) -> Any:
    if is_dataclass(obj) and not isinstance(obj, type):
        return asdict(obj)
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json")
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, default=_jsonable, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{path}: file not found") from None
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path}: not valid JSON ({exc})") from None


def write_yaml(path: str | os.PathLike, obj: Any) -> Path:
    data = json.loads(json.dumps(obj, default=_jsonable))
    return write_text(path, yaml.safe_dump(data, sort_keys=False))


def save_with(path: str | os.PathLike, writer: Callable[[Path], None]) -> Path:
    """Atomically save through a writer that takes a path (e.g. `lambda p: torch.save(obj, p)`)."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def load_torch(path: str | os.PathLike, what: str, **kw: Any) -> Any:
    """`torch.load` of a d3n file, guarded: a missing or unreadable file is an ArtifactError naming
    the file and `what` it should hold. Defaults to `weights_only=True` (no code runs on load) and
    `map_location="cpu"`; a caller that must unpickle objects says `weights_only=False` itself."""
    import torch  # here, not at the top: d3n's core imports without torch

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: {what} not found")
    weights_only = kw.pop("weights_only", True)
    kw.setdefault("map_location", "cpu")
    try:
        return torch.load(path, weights_only=weights_only, **kw)
    except Exception as exc:  # torch raises many types for a corrupt or foreign file
        raise ArtifactError(f"{path}: not a readable {what} ({exc})") from None


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint(path: str | os.PathLike) -> str:
    """A content fingerprint of a file or a folder (hash of relative names and file hashes).

    Files whose names start with '.' (temporaries) and the manifest itself are left out, so a
    folder's fingerprint is stable once its stage has finished.
    """
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{path}: does not exist")
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path)
        if any(part.startswith(".") for part in rel.parts) or rel.name == MANIFEST:
            continue
        h.update(str(rel).encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def environment() -> dict[str, str]:
    """Versions that matter for reproducing a run; torch etc. only if already imported."""
    env = {"d3n": __version__, "python": sys.version.split()[0], "platform": platform.platform()}
    for name in ("torch", "ultralytics", "diffusers", "onnx", "onnxruntime", "numpy", "cv2"):
        mod = sys.modules.get(name)
        if mod is not None:
            env[name] = getattr(mod, "__version__", "?")
    return env


class Manifest:
    """The stage manifest: what ran, on which inputs, how long, and whether it finished."""

    def __init__(self, run_dir: str | os.PathLike, stage: str, inputs: dict[str, str] | None = None,
                 config: Any = None):
        self.run_dir = Path(run_dir)
        self.stage = stage
        self.inputs = dict(inputs or {})
        self.config = config
        self.started = time.time()
        self.timings: dict[str, float] = {}
        self.outputs: dict[str, str] = {}

    def input_fingerprints(self) -> dict[str, str]:
        return {name: fingerprint(p) for name, p in self.inputs.items()}

    @contextlib.contextmanager
    def timed(self, name: str) -> Iterator[None]:
        t0 = time.time()
        try:
            yield
        finally:
            self.timings[name] = round(time.time() - t0, 3)

    def complete(self, outputs: list[str] | None = None) -> Path:
        """Write the manifest last, marking the run complete."""
        for name in outputs or []:
            f = self.run_dir / name
            if not f.exists():
                raise ArtifactError(f"{f}: stage '{self.stage}' finished without writing it")
            self.outputs[name] = fingerprint(f)
        data = {
            "stage": self.stage,
            "complete": True,
            "inputs": {k: str(v) for k, v in self.inputs.items()},
            "input_fingerprints": self.input_fingerprints(),
            "config": self.config,
            "outputs": self.outputs,
            "environment": environment(),
            "started": self.started,
            "finished": time.time(),
            "seconds": round(time.time() - self.started, 3),
            "timings": self.timings,
        }
        return write_json(self.run_dir / MANIFEST, data)


def is_complete(run_dir: str | os.PathLike, inputs: dict[str, str] | None = None,
                config: Any = None) -> bool:
    """True if `run_dir` holds a complete manifest for the same inputs (and config, if given)."""
    path = Path(run_dir) / MANIFEST
    if not path.exists():
        return False
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        return False
    if not data.get("complete"):
        return False
    for name, fp in data.get("outputs", {}).items():
        f = Path(run_dir) / name
        if not f.exists() or fingerprint(f) != fp:
            return False
    if inputs is not None:
        want = {k: fingerprint(v) for k, v in inputs.items()}
        if want != data.get("input_fingerprints"):
            return False
    if config is not None:
        if json.loads(json.dumps(config, default=_jsonable)) != data.get("config"):
            return False
    return True
