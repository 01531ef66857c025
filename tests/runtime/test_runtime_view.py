"""The live view (`d3n run --view-port`): the page, /view/stats and the MJPEG streams while two
sources run, counts that match the JSONL, viewers that cannot stall the pipeline, the model's
identity across a swap, the options, and a real headless chromium showing frames and counts."""

from __future__ import annotations

import base64
import collections
import fcntl
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import NAMES, free_port, write_video

from d3n import sidecar as sidecar_mod
from d3n.cli import main
from d3n.runtime import view as view_mod
from d3n.runtime.pipeline import run_pipeline
from d3n.runtime.postprocess import Detections
from d3n.runtime.sinks import Result
from d3n.runtime.sources import Frame
from d3n.runtime.stats import Stats
from d3n.runtime.swap import ModelId
from d3n.runtime.view import ViewServer

SOURCES = ("top", "side")


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("view-clips")
    return {name: write_video(folder / f"{name}.avi", n=200) for name in SOURCES}


class LiveRun:
    """A two-source run_pipeline in a thread (8 frames/s per source: about 25 s of video; conf
    0.5, so that the untrained model draws a few boxes, not hundreds),
    with a JSONL sink and the live view on a free port; `stop()` ends it."""

    def __init__(self, model: Path, clips: dict[str, Path], out: Path, view_fps: float = 10):
        self.port, self.jsonl, self.stop_event = free_port(), out / "det.jsonl", threading.Event()
        self.base, self.result = f"http://127.0.0.1:{self.port}", {}
        sources = [f"{name}={path}" for name, path in clips.items()]
        self.thread = threading.Thread(target=lambda: self.result.update(run_pipeline(
            model, sources, sinks=[f"jsonl:{self.jsonl}"], conf=0.5, max_fps=8, warmup=0, threads=1,
            status_every=0, stop_event=self.stop_event, view_port=self.port, view_fps=view_fps)),
            daemon=True)
        self.thread.start()

    def stats(self) -> dict:
        return json.loads(urllib.request.urlopen(self.base + "/view/stats", timeout=5).read())

    def wait_frames(self, n: int, timeout: float = 60) -> dict:
        """/view/stats once every source has at least `n` results."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.thread.is_alive():
            try:
                doc = self.stats()
                if all(s["frames"] >= n for s in doc["sources"]):
                    return doc
            except OSError:  # not listening yet
                pass
            time.sleep(0.2)
        raise AssertionError(f"the view never showed {n} results per source")

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(30)
        assert not self.thread.is_alive()


def jsonl_counts(path: Path, source: str, n: int) -> tuple[dict[str, int], int]:
    """Detections per class in the first `n` JSONL lines of `source`, and the last one's frame.
    The view counts a result after the JSONL sink wrote it, so these lines exist."""
    rows = [r for r in map(json.loads, path.read_text().splitlines()) if r["source"] == source]
    assert len(rows) >= n, f"{source}: the view counted {n} results, the JSONL holds {len(rows)}"
    counts = collections.Counter(d["class"] for r in rows[:n] for d in r["detections"])
    return {c: counts.get(c, 0) for c in NAMES}, rows[n - 1]["frame"]


def check_counts_match_jsonl(doc: dict, jsonl: Path) -> None:
    for src in doc["sources"]:
        counts, last = jsonl_counts(jsonl, src["name"], src["frames"])
        assert src["counts"] == counts and src["last_frame"] == last, src["name"]


def mjpeg_frames(url: str, n: int, timeout: float = 20) -> list[np.ndarray]:
    """The first `n` parts of an MJPEG stream, each checked to be a JPEG and decoded."""
    resp = urllib.request.urlopen(url, timeout=timeout)
    ctype = resp.headers["Content-Type"]
    assert ctype.startswith("multipart/x-mixed-replace; boundary="), ctype
    boundary, frames = b"--" + ctype.split("boundary=")[1].encode(), []
    try:
        while len(frames) < n:
            line = resp.readline()
            assert line, "the stream ended early"
            if line.strip() != boundary:
                continue
            headers = dict(h.decode().lower().split(": ", 1) for h in iter(lambda: resp.readline().strip(), b""))
            assert headers["content-type"] == "image/jpeg"
            data = resp.read(int(headers["content-length"]))
            assert data[:3] == b"\xff\xd8\xff", "not a JPEG"
            frames.append(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR))
            assert frames[-1] is not None, "a JPEG that OpenCV cannot decode"
    finally:
        resp.close()
    return frames


def listening_addresses(port: int) -> set[str]:
    """Local addresses with a listening TCP socket on `port`, from /proc/net/tcp and tcp6."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, p = local.split(":")
            if state == "0A" and int(p, 16) == port:  # 0A: LISTEN
                found.add(socket.inet_ntoa(bytes.fromhex(addr)[::-1]) if len(addr) == 8 else addr)
    return found


def test_page_stats_and_mjpeg_while_two_sources_run(tiny_onnx, clips, tmp_path):
    run = LiveRun(tiny_onnx, clips, tmp_path)
    try:
        first = run.wait_frames(3)
        sc = sidecar_mod.load(tiny_onnx)
        assert first["model"] == {"file": "tiny.onnx", "sha256": sc.model_sha256,
                                  "short": sc.model_sha256[:12]}
        assert first["classes"] == NAMES and [s["name"] for s in first["sources"]] == list(SOURCES)
        assert all(s["state"] == "running" and s["fps"] > 0 and s["latency_ms"] > 0 for s in first["sources"])
        resp = urllib.request.urlopen(run.base + "/", timeout=5)
        page = resp.read().decode()
        assert resp.headers["Content-Type"].startswith("text/html")
        for text in ("/view/stream/top", "/view/stream/side", "tiny.onnx", sc.model_sha256[:12], *NAMES):
            assert text in page
        assert "://" not in page, "the page must not load anything from elsewhere"
        frames = mjpeg_frames(run.base + "/view/stream/top", 4)
        assert all(f.shape == (150, 200, 3) for f in frames)
        assert np.abs(frames[0].astype(int) - frames[-1]).mean() > 2, "the stream does not change"
        check_counts_match_jsonl(first, run.jsonl)
        later = run.stats()  # the numbers move on, and still match the JSONL
        assert all(b["frames"] > a["frames"] for a, b in zip(first["sources"], later["sources"], strict=True))
        check_counts_match_jsonl(later, run.jsonl)
        for path in ("/view/stream/nope", "/favicon.ico"):
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(run.base + path, timeout=5)
            assert err.value.code == 404
        assert listening_addresses(run.port) == {"127.0.0.1"}  # not 0.0.0.0, not ::
        with pytest.raises(ConnectionRefusedError):  # 127.0.0.2 is loopback too, but not bound
            socket.create_connection(("127.0.0.2", run.port), timeout=5)
    finally:
        run.stop()
    assert run.result["view_port"] == run.port
    with pytest.raises(ConnectionRefusedError):  # the port is released at the end of the run
        socket.create_connection(("127.0.0.1", run.port), timeout=5)


def fake_result(i: int, image: np.ndarray, source: str = "cam") -> Result:
    det = Detections(np.array([[10, 10, 300, 200]], np.float32), np.array([0.9], np.float32),
                     np.array([i % len(NAMES)]))
    now = time.time()
    return Result(Frame(image, i, now, time.monotonic(), source), det, NAMES, now, 0.02,
                  ModelId("m.onnx", "ab" * 32))


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_slow_and_extra_viewers_never_stall_the_pipeline(monkeypatch):
    """A viewer that reads nothing is dropped after the send timeout, one that reads gets the
    newest frames meanwhile, a viewer over the limit gets 503, and offer() (the post stage's
    only call) never waits on any of them."""
    monkeypatch.setattr(view_mod, "SEND_TIMEOUT_S", 3.0)
    rng = np.random.default_rng(0)  # noise: big JPEGs that fill a stalled socket in a few frames
    images = [rng.integers(0, 256, (1080, 1920, 3), dtype=np.uint8) for _ in range(3)]
    server = ViewServer(Stats(), ["cam"], NAMES, port=0, fps=10, max_streams=2).start()
    base, slow = f"http://127.0.0.1:{server.port}", socket.socket()
    stop, waits = threading.Event(), []

    def feed():
        i = 0
        while not stop.is_set():
            t0 = time.monotonic()
            server.offer(fake_result(i, images[i % 3]))
            waits.append(time.monotonic() - t0)
            i += 1
            time.sleep(0.01)  # a 100 FPS pipeline

    feeder = threading.Thread(target=feed, daemon=True)
    try:
        feeder.start()
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.connect(("127.0.0.1", server.port))
        slow.sendall(b"GET /view/stream/cam HTTP/1.0\r\n\r\n")  # ... and never reads
        wait_until(lambda: server.streams == 1, 5, "the stalled viewer's stream never started")
        frames = mjpeg_frames(base + "/view/stream/cam", 6)  # meanwhile a second viewer reads
        assert all(f.shape == (720, 1280, 3) for f in frames)  # scaled down to MAX_WIDTH
        wait_until(lambda: server.streams == 1, 2, "the second viewer's stream did not end")
        extra = urllib.request.urlopen(base + "/view/stream/cam", timeout=5)  # 2 of 2 streams
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(base + "/view/stream/cam", timeout=5)
        assert err.value.code == 503
        extra.close()
        wait_until(lambda: server.streams == 0, 10, "a viewer that reads nothing was not dropped")
    finally:
        stop.set()
        feeder.join(5)
        slow.close()
        server.stop()
    assert len(waits) > 100 and max(waits) < 0.1, f"offer() waited {max(waits):.3f} s"
    assert server.snapshot()["sources"][0]["frames"] == len(waits)


def test_model_identity_follows_a_hot_swap():
    stats = Stats()
    stats.set_model("old.onnx", "1" * 64)
    server = ViewServer(stats, ["cam"], NAMES, port=0).start()
    base = f"http://127.0.0.1:{server.port}"
    try:
        doc = json.loads(urllib.request.urlopen(base + "/view/stats", timeout=5).read())
        assert doc["model"]["file"] == "old.onnx" and doc["model"]["short"] == "1" * 12
        stats.set_model("new.onnx", "2" * 64)  # what ModelSlot does when a new model goes live
        stats.model_swap("ok")
        doc = json.loads(urllib.request.urlopen(base + "/view/stats", timeout=5).read())
        assert doc["model"]["short"] == "2" * 12 and doc["model_swaps"]["ok"] == 1
        page = urllib.request.urlopen(base + "/", timeout=5).read().decode()
        assert "new.onnx" in page and "2" * 12 in page and "old.onnx" not in page
    finally:
        server.stop()


def test_any_source_text_has_a_stream_url():
    """A lone unnamed --source keeps its own text as its name: a path or a URL with a query."""
    name = "rtsp://cam/live?ch=1 &x"
    server = ViewServer(Stats(), [name], NAMES, port=0, fps=30).start()
    try:
        server.offer(fake_result(0, np.full((100, 160, 3), 90, np.uint8), source=name))
        doc = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{server.port}/view/stats", timeout=5).read())
        assert doc["sources"][0]["name"] == name and doc["sources"][0]["counts"]["crack"] == 1
        frames = mjpeg_frames(f"http://127.0.0.1:{server.port}{doc['sources'][0]['stream']}", 1)
        assert frames[0].shape == (100, 160, 3)
    finally:
        server.stop()


def test_view_options_are_checked(tiny_onnx, clips, tmp_path, capsys):
    def run(*args):
        rc = main(["run", "--model", str(tiny_onnx), "--source", str(clips["top"]), *map(str, args)])
        return rc, capsys.readouterr().err

    rc, err = run("--view-fps", 5)
    assert rc == 1 and "--view-fps needs --view-port" in err
    rc, err = run("--view-port", free_port(), "--view-fps", 0)
    assert rc == 1 and "--view-fps must be in (0, 30]" in err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        rc, err = run("--view-port", port, "--sink", f"jsonl:{tmp_path}/det.jsonl")
    assert rc == 1 and f"--view-port {port}: cannot listen on 127.0.0.1:{port}" in err
    assert not (tmp_path / "det.jsonl").exists()  # refused before any output
    port = free_port()
    rc, err = run("--view-port", port, "--view-host", "127.0.0.1", "--view-fps", 2, "--max-frames", 3,
                  "--summary", tmp_path / "s.json")
    summary = json.loads((tmp_path / "s.json").read_text())
    assert rc == 0 and summary["view_port"] == port and summary["frames"] == 3, err


# A real browser ---------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class Chromium:
    """Headless chromium driven over the DevTools protocol on a pipe (--remote-debugging-pipe:
    it reads commands on fd 3 and answers on fd 4, NUL-separated JSON): no WebDriver, no port."""

    def __init__(self, profile: Path, log: Path):
        def high(fd: int) -> int:  # out of the way of fds 3 and 4, which the shell sets up
            moved = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
            os.close(fd)
            return moved

        cmd_r, self.cmd_w = map(high, os.pipe())
        self.out_r, out_w = map(high, os.pipe())
        flags = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--remote-debugging-pipe", f"--user-data-dir={profile}", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--window-size=1280,900", "about:blank"]
        shell = f'exec "$0" "$@" 3<&{cmd_r} 4>&{out_w} {cmd_r}<&- {out_w}>&-'
        with open(log, "wb") as err:
            self.proc = subprocess.Popen(["bash", "-c", shell, CHROMIUM, *flags], pass_fds=(cmd_r, out_w),
                                         stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        os.close(cmd_r)
        os.close(out_w)
        self.buf, self.last_id, self.session = b"", 0, None

    def send(self, method: str, params: dict | None = None, timeout: float = 30) -> dict:
        self.last_id += 1
        msg = {"id": self.last_id, "method": method, "params": params or {}}
        if self.session and not method.startswith(("Target.", "Browser.")):
            msg["sessionId"] = self.session
        os.write(self.cmd_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self.last_id:
                assert "error" not in reply, f"{method}: {reply['error']}"
                return reply["result"]

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self.buf:
            ready, _, _ = select.select([self.out_r], [], [], max(deadline - time.monotonic(), 0))
            assert ready, "chromium did not answer in time"
            chunk = os.read(self.out_r, 1 << 20)
            assert chunk, "chromium closed the pipe"
            self.buf += chunk
        msg, _, self.buf = self.buf.partition(b"\0")
        return json.loads(msg)

    def open(self, url: str) -> None:
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.send("Page.navigate", {"url": url})

    def eval(self, expression: str):
        return self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})["result"].get("value")

    def screenshot(self, clip: dict) -> np.ndarray:
        data = self.send("Page.captureScreenshot", {"format": "png", "clip": {**clip, "scale": 1}})["data"]
        return cv2.imdecode(np.frombuffer(base64.b64decode(data), np.uint8), cv2.IMREAD_COLOR)

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
            self.proc.wait(10)
        except (AssertionError, OSError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, signal.SIGKILL)  # the group of the browser started here
            self.proc.wait(10)
        finally:
            os.close(self.cmd_w)
            os.close(self.out_r)


READ_PAGE = """JSON.stringify({
  polls: Number(document.body.dataset.polls || 0),
  model: document.getElementById('model').textContent, sha: document.getElementById('sha').textContent,
  sources: Array.from(document.querySelectorAll('section[data-source]')).map(c => ({
    name: c.dataset.source, state: c.querySelector('.state').textContent,
    frames: Number(c.querySelector('.frames').textContent),
    shown: c.querySelector('img').naturalWidth,
    counts: Object.fromEntries(Array.from(c.querySelectorAll('tbody tr')).map(
      r => [r.cells[0].textContent, Number(r.cells[1].textContent)]))}))})"""


def wait_for_page(browser: Chromium, timeout: float = 60) -> dict:
    """What the page shows once it has polled the stats and every stream shows a frame."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        shown = json.loads(browser.eval(READ_PAGE) or "{}")
        if shown.get("polls", 0) >= 1 and all(s["shown"] > 0 and s["frames"] > 0 for s in shown["sources"]):
            return shown
        time.sleep(0.3)
    raise AssertionError(f"the page never showed frames and counts: {shown}")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium): "
                                             "the headless browser check of the live view needs it")
def test_headless_chromium_shows_changing_frames_and_the_jsonl_counts(tiny_onnx, clips, tmp_path):
    run = LiveRun(tiny_onnx, clips, tmp_path, view_fps=5)
    browser = None
    try:
        run.wait_frames(2)
        browser = Chromium(tmp_path / "profile", tmp_path / "chromium.log")
        browser.open(run.base + "/")
        shown = wait_for_page(browser)
        assert [s["name"] for s in shown["sources"]] == list(SOURCES)
        sc = sidecar_mod.load(tiny_onnx)
        assert shown["model"] == "tiny.onnx" and shown["sha"] == sc.model_sha256[:12]
        assert all(s["state"] == "running" and s["shown"] == 200 for s in shown["sources"])
        clip = json.loads(browser.eval("JSON.stringify((r => ({x: r.x, y: r.y, width: r.width, "
                                       "height: r.height}))(document.querySelector('img').getBoundingClientRect()))"))
        before = browser.screenshot(clip)
        time.sleep(1.5)  # several view frames at 5 per second
        after = browser.screenshot(clip)
        assert before.std() > 10, "the first stream shows a blank image"
        assert np.abs(before.astype(int) - after).mean() > 2, "the frame shown did not change"
        shown = json.loads(browser.eval(READ_PAGE))  # one poll's numbers: frames and counts agree
        for src in shown["sources"]:
            counts, _ = jsonl_counts(run.jsonl, src["name"], src["frames"])
            assert src["counts"] == counts, src["name"]
    finally:
        if browser is not None:
            browser.close()
        run.stop()
