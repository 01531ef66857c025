"""Gathering frames from several sources into one inference batch.

One model serves every source of a run. The preprocess stage asks a `Gatherer` for the next
batch; the gatherer polls the sources (each still captured by its own thread, live ones keeping
only their newest frame, files queueing theirs in order) and returns what is ready:

- **Bounded wait.** Once a first frame is in hand, the batch waits at most `wait_s` for the
  other sources to deliver, then goes with what it has. A source that is down (reconnecting,
  lost) or has ended is not waited for at all, so it never stalls the others; if no other
  running source can add a frame the batch goes at once.
- **Round robin.** Sources are visited in turn starting after the last one served, so when
  more frames are ready than a batch holds, the ones left out go first next time: no source
  starves another. A live source gives at most one frame (its newest) per batch; a file source
  may give several in order (further rounds) when the batch has room, e.g. when it is the
  only source left.
- **--max-fps** applies per source: a source is skipped until its next frame is due.

The cap (the model's max batch, `--max-batch`) is passed per call, because a hot swap may
bring a model with another batch size.
"""

from __future__ import annotations

import threading
import time

from d3n.runtime.sources import Frame, Source

IDLE_S = 0.2  # nothing ready: hand back an empty batch this often, so a stop or swap is seen


class Wakeup:
    """A counter that capture threads bump on every new frame and at their end. A waiter reads
    it before polling the sources, so a frame published while it polled is never missed."""

    def __init__(self):
        self._cond = threading.Condition()
        self.count = 0

    def notify(self) -> None:
        with self._cond:
            self.count += 1
            self._cond.notify_all()

    def wait(self, seen: int, timeout: float) -> None:
        """Until the count differs from `seen` (something happened) or `timeout` s passed."""
        if timeout > 0:
            with self._cond:
                self._cond.wait_for(lambda: self.count != seen, timeout)


class Gatherer:
    """Forms inference batches from the frames `sources` have ready (see module docstring)."""

    def __init__(self, sources: list[Source], wait_s: float = 0.005, max_fps: float | None = None):
        self.sources = list(sources)
        self.wait_s = wait_s
        self.interval = 1.0 / max_fps if max_fps else 0.0
        self.wake = Wakeup()
        for src in self.sources:
            src.wake = self.wake
        self.cursor = 0  # the source visited first in the next round
        self.due = [0.0] * len(self.sources)  # --max-fps: when each source may give a frame
        self.ended = [False] * len(self.sources)

    def next_batch(self, cap: int) -> list[Frame] | None:
        """Up to `cap` frames, oldest source turn first; [] when none came within IDLE_S;
        None once every source has ended and nothing is left."""
        batch: list[Frame] = []
        taken: set[int] = set()  # live sources already in this batch
        deadline = time.monotonic() + IDLE_S
        while True:
            seen, had = self.wake.count, len(batch)
            if self._round(batch, taken, cap):
                if len(batch) >= cap:
                    return batch
                if not had:  # the wait for the others counts from the first frame
                    deadline = time.monotonic() + self.wait_s
                continue  # another round: file sources may have more frames queued
            if not batch and all(self.ended):
                return None
            if batch and not self._can_grow(taken):
                return batch
            now = time.monotonic()
            if now >= deadline:
                return batch
            self.wake.wait(seen, min(deadline, self._next_due(now)) - now)

    def _round(self, batch: list[Frame], taken: set[int], cap: int) -> bool:
        """One round over the sources; True if it added a frame."""
        n, now, last = len(self.sources), time.monotonic(), None
        for k in range(n):
            if len(batch) >= cap:
                break
            i = (self.cursor + k) % n
            if self.ended[i] or i in taken or now < self.due[i]:
                continue
            frame = self.sources[i].poll()
            if frame is None:
                self.ended[i] = True
            elif frame is not False:
                batch.append(frame)
                last = i
                if self.sources[i].live:
                    taken.add(i)
                if self.interval:  # catch up after a late frame, but never in a burst
                    self.due[i] = max((self.due[i] or now) + self.interval, now)
        if last is None:
            return False
        self.cursor = (last + 1) % n  # round robin: the next round starts after the last served
        return True

    def _can_grow(self, taken: set[int]) -> bool:
        """Whether some source that is up could still add a frame to this batch."""
        return any(not self.ended[i] and i not in taken and src.state == "running"
                   for i, src in enumerate(self.sources))

    def _next_due(self, now: float) -> float:
        """When the next throttled source may give a frame (infinity when none is waiting)."""
        later = [d for i, d in enumerate(self.due) if d > now and not self.ended[i]]
        return min(later, default=float("inf"))
