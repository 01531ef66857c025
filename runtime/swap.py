"""Hot model swap (`d3n run --watch`): a new model reaches the line without stopping it.

Threads and hand-over:

- `ModelWatcher` (one daemon thread) polls the watched path every `interval` seconds: the size
  and mtime of each model file and the sha256 of its sidecar. A change is acted on once it has
  settled (the same on two polls in a row), so a half-copied file is never loaded. The new model
  is then loaded, checked against the running one and warmed up in that same thread, off the
  hot path; a bad one is refused (logged, counted) and the running model carries on.
- `ModelSlot` holds the running model and, once validated, the next one. The preprocess stage
  asks it for the model at the top of every iteration, so the switch falls between two frames
  (two batches, with several sources: a batch is prepared for one model). Each queued batch
  carries the `Model` it was prepared for: the infer stage runs it on that model and the post
  stage decodes its frames with that model's sidecar. Frames prepared before the
  switch finish on the old model, none is dropped or run twice, and a new input size or
  preprocessing is safe. The old model is closed by the infer stage after its last frame.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from d3n import sidecar as sidecar_mod
from d3n.errors import ArtifactError, D3NError
from d3n.runtime.backends import Backend, check_output_shape, model_files, open_backend
from d3n.runtime.stats import Stats

log = logging.getLogger(__name__)

SHORT_SHA = 12  # hex digits of the model sha256 in each JSONL record (48 bits: no collisions)


@dataclass(frozen=True)
class ModelId:
    """Which model made a result: its file name and the sha256 its sidecar vouches for."""

    file: str
    sha256: str

    @property
    def short(self) -> str:
        return self.sha256[:SHORT_SHA]

    def __str__(self) -> str:
        return f"{self.file} (sha256 {self.short})"


class Model:
    """A loaded backend with what the stages need from its sidecar."""

    def __init__(self, backend: Backend, owned: bool = True):
        sc = backend.sidecar
        self.backend, self.owned = backend, owned  # a caller's Backend is not ours to close
        self.id = ModelId(backend.model_path.name, sc.model_sha256)
        self.names = list(sc.names)
        self.input_hw = tuple(backend.input_shape[2:])
        self.preprocess = sc.preprocess
        self.kind, self.box_format = sc.output.kind, sc.output.box_format
        self.max_batch = backend.max_batch  # 1: one frame per inference; None: no bound
        self.in_flight = 0  # frames prepared for this model and not yet through inference
        self.retired = False  # replaced: close once in_flight drops to 0
        self.closed = False

    def close(self) -> None:
        if not self.closed and self.owned:
            self.backend.close()
        self.closed = True


class ModelSlot:
    """The model the pipeline runs and the validated one waiting to replace it."""

    def __init__(self, model: Model, stats: Stats):
        self._lock = threading.Lock()
        self.stats = stats
        self.active = model
        self._pending: Model | None = None
        self._retired: list[Model] = []  # replaced, frames still in flight
        self._closed = False
        stats.set_model(model.id.file, model.id.sha256)

    @property
    def latest(self) -> Model:
        """The model new frames will get: the pending one, else the active one."""
        with self._lock:
            return self._pending or self.active

    def offer(self, model: Model) -> bool:
        """Stage a validated model; it goes live at the preprocess stage's next iteration.
        False (and the model closed) when the run is already over."""
        with self._lock:
            if self._closed:
                drop, accepted = model, False
            else:
                drop, self._pending, accepted = self._pending, model, True
        if drop is not None:
            if accepted:
                log.info("model swap: %s superseded by %s before it went live", drop.id, model.id)
            drop.close()
        return accepted

    def current(self, after_frame: int | str | None = None) -> Model:
        """The model for the next frame (or batch); called by the preprocess stage between two
        batches, the only place where a pending model goes live. `after_frame` names the last
        frame prepared, for the log."""
        if self._pending is None:  # the common case: no lock on the hot path
            return self.active
        with self._lock:
            new, self._pending = self._pending, None
            if new is None:
                return self.active
            old, self.active = self.active, new
            old.retired = True
            self._retired.append(old)
        self.stats.set_model(new.id.file, new.id.sha256)
        self.stats.model_swap("ok")
        where = "from the first frame" if after_frame is None else f"after frame {after_frame}"
        log.info("model swap: %s -> %s, %s; frames already prepared finish on %s", old.id, new.id,
                 where, old.id.file)
        self._close_idle(old)
        return new

    def prepared(self, model: Model, n: int = 1) -> None:
        """The preprocess stage queued `n` frames (a batch) for `model`."""
        with self._lock:
            model.in_flight += n

    def inferred(self, model: Model, n: int = 1) -> None:
        """The infer stage is done with `n` frames of `model`: a replaced model is closed after
        its last one (the queues are FIFO, so none can follow)."""
        with self._lock:
            model.in_flight -= n
        self._close_idle(model)

    def _close_idle(self, model: Model) -> None:
        with self._lock:
            idle = model.retired and model.in_flight <= 0 and model in self._retired
            if idle:
                self._retired.remove(model)
        if idle:
            model.close()
            log.debug("model swap: closed %s after its last frame", model.id)

    def close(self) -> None:
        """End of the run: close every model still open; later offers are closed at once."""
        with self._lock:
            self._closed = True
            models = [self.active, self._pending, *self._retired]
            self._pending, self._retired = None, []
        for m in models:
            if m is not None:
                m.close()


# Watching ----------------------------------------------------------------------------------

Entry = tuple[int, int, str | None]  # model size, mtime_ns, sidecar sha256 (None: no sidecar)


def _sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:  # not there (yet), or removed between listing and reading
        return None


def snapshot(path: Path) -> dict[Path, Entry]:
    """What the watcher compares between polls: per model file, its size and mtime and the
    sha256 of its sidecar (cheap: the model itself is hashed only when it is loaded)."""
    files = model_files(path) if path.is_dir() else [path]
    out = {}
    for f in files:
        try:
            st = f.stat()
        except OSError:
            continue
        out[f] = (st.st_size, st.st_mtime_ns, _sha256(sidecar_mod.sidecar_path(f)))
    return out


def _reason(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, D3NError) else f"{type(exc).__name__}: {exc}"


def load_candidate(path: Path, running: Model, device: str, warmup: int, threads: int | None = None,
                   batch: int = 1, precision: str | None = None) -> Model | None:
    """Load `path`, check it against `running` and warm it up (also at `batch` frames, or its
    own max batch if smaller, when its batch axis is dynamic); None if it is the running model.

    Raises (ArtifactError, ConfigError, or whatever the backend raises) for a model to refuse.
    The class names must be the same: sinks, --class-conf and whoever reads the detections
    count on them. The input size may change: preprocessing follows each frame's model.
    """
    sc = sidecar_mod.load(path)  # model and sidecar exist, sidecar for this file, hash matches
    if path.name == running.id.file and sc == running.backend.sidecar:
        return None  # re-copied or touched, same content
    side = sidecar_mod.sidecar_path(path)
    if list(sc.names) != running.names:
        raise ArtifactError(f"{side}: class names {list(sc.names)} differ from those of the "
                            f"running model {running.id.file} {running.names}; a new model must "
                            "detect the same classes, in the same order")
    # input and output shapes checked against the sidecar; same threads as the running model
    backend = open_backend(path, device, intra_op_threads=threads, inference_precision=precision)
    try:
        _warm_up(backend, warmup, min(batch, backend.max_batch or batch))
    except BaseException:
        backend.close()  # nobody else holds it; a TensorRT engine holds device memory
        raise
    model = Model(backend)
    if model.input_hw != running.input_hw:
        log.info("model swap: input size %s -> %s; preprocessing follows the new sidecar",
                 "x".join(map(str, running.input_hw)), "x".join(map(str, model.input_hw)))
    return model


def _warm_up(backend: Backend, n: int, batch: int = 1) -> None:
    """Warm-up runs (the TensorRT EP builds its engine here, for batch 1 and for the batch the
    run forms), then one inference whose output must fit the sidecar and be finite: the model
    has to work before it gets a frame."""
    if n > 0:
        backend.warmup(n)
        if batch > 1:
            backend.warmup(n, batch)
    out = backend.infer(np.zeros(backend.input_shape, dtype=backend.input_dtype))
    check_output_shape(backend.model_path, backend.sidecar, np.shape(out))
    if not np.all(np.isfinite(out)):
        raise ArtifactError(f"{backend.model_path}: warm-up inference gave non-finite values")


class ModelWatcher:
    """Polls `path` (a model file or a release folder) and hands validated new models to a
    `ModelSlot`. Create it before the first model is loaded: its first snapshot is the
    baseline, so a model replaced during start-up is still picked up."""

    def __init__(self, path: str | Path, stats: Stats, *, interval: float = 2.0,
                 device: str = "auto", warmup: int = 1, threads: int | None = None, batch: int = 1,
                 precision: str | None = None):
        self.path = Path(path)
        self.stats, self.interval, self.device, self.warmup = stats, interval, device, warmup
        # as the running model: intra-op threads, batch, OpenVINO inference precision
        self.threads, self.batch, self.precision = threads, batch, precision
        self.known = snapshot(self.path)  # the state last acted upon
        self.slot: ModelSlot | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False  # a poll error is logged once, not every interval

    def start(self, slot: ModelSlot) -> ModelWatcher:
        self.slot = slot
        self._thread = threading.Thread(target=self._loop, name="model-watcher", daemon=True)
        self._thread.start()
        log.info("model swap: watching %s every %g s", self.path, self.interval)
        return self

    def stop(self, timeout: float = 2.0) -> None:
        """Stop polling. A load in progress (a TensorRT engine build can take minutes) is not
        waited for beyond `timeout`: the slot, once closed, closes what it offers."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("model swap: still loading a model at the end of the run; abandoned")

    def _loop(self) -> None:
        prev = self.known
        while not self._stop.wait(self.interval):
            try:
                prev = self.poll(prev)
            except Exception:  # noqa: BLE001 - the watcher must never take the line down
                log.exception("model swap: watching %s failed; still running %s", self.path,
                              self.slot.active.id)

    def poll(self, prev: dict[Path, Entry]) -> dict[Path, Entry]:
        """One poll: act on a change once it is the same as on the previous poll."""
        try:
            state = snapshot(self.path)
            self._failing = False
        except OSError as exc:  # the folder renamed or unmounted for a moment
            if not self._failing:
                log.warning("model swap: cannot read %s (%s); retrying", self.path, exc)
            self._failing = True
            return prev
        if state != prev or state == self.known:
            return state  # still changing (wait for it to settle), or nothing new
        changed = [p for p, entry in state.items() if self.known.get(p) != entry]
        self.known = state  # acted upon once: a refused model is retried only when it changes
        if len(changed) > 1:
            self._refuse(changed, f"{len(changed)} model files changed at once "
                         f"({', '.join(p.name for p in changed)}); expected one")
        elif changed and state[changed[0]][2] is None:
            log.warning("model swap: %s has no sidecar %s yet; waiting for it", changed[0],
                        sidecar_mod.sidecar_path(changed[0]).name)
        elif changed:
            self._try(changed[0], state[changed[0]])
        return state

    def _try(self, path: Path, entry: Entry) -> None:
        running = self.slot.latest
        log.info("model swap: loading %s (sidecar %s) beside the running %s", path,
                 sidecar_mod.sidecar_path(path).name, running.id)
        try:
            model = load_candidate(path, running, self.device, self.warmup, self.threads, self.batch,
                                   self.precision)
        except Exception as exc:  # noqa: BLE001 - any failure refuses the model, never the line
            self._refuse([path], _reason(exc))
            return
        if model is None:
            log.info("model swap: %s is the running model (same sha256 and sidecar); nothing to do",
                     path)
            return
        if snapshot(self.path).get(path) != entry:  # rewritten while loading: wait for it to settle
            model.close()
            self.known = {**self.known, path: None}
            log.info("model swap: %s changed while it was loaded; retrying once it settles", path)
            return
        if self.slot.offer(model):
            log.info("model swap: %s validated; it takes over at the next frame", model.id)

    def _refuse(self, paths: list[Path], reason: str) -> None:
        self.stats.model_swap("refused")
        files = ", ".join(f"{p} (sidecar {sidecar_mod.sidecar_path(p)})" for p in paths)
        log.error("model swap refused: %s: %s; still running %s", files, reason,
                  self.slot.latest.id)
