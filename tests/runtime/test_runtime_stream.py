"""Live streams that die and come back: the runtime reconnects every time and keeps producing.

Two loopback servers built on ffmpeg, killed and restarted three times while the runtime runs:
- HTTP: ffmpeg serves MPEG-TS itself (`-listen 1`).
- RTSP: ffmpeg's RTSP muxer cannot act as a server (`-rtsp_flags listen` exists only for its
  demuxer), so ffmpeg sends RTP over UDP and a small RTSP server here (OPTIONS, DESCRIBE, SETUP,
  PLAY, RTP interleaved over TCP) relays it to the client: a real RTSP session for OpenCV/FFmpeg.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import free_port, write_video

from d3n.runtime.pipeline import run_pipeline
from d3n.runtime.sources import Source
from d3n.runtime.stats import Stats

pytestmark = pytest.mark.skipif(shutil.which("ffmpeg") is None,
                                reason="ffmpeg not on PATH (apt-get install ffmpeg)")
RESTARTS = 3


class HttpServer:
    """ffmpeg serving the clip, looped in real time, as MPEG-TS over HTTP on 127.0.0.1."""

    def __init__(self, clip: Path, port: int):
        self.clip, self.port, self.proc = clip, port, None
        self.url = f"http://127.0.0.1:{port}/live.ts"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["ffmpeg", "-hide_banner", "-loglevel", "error", "-re", "-stream_loop", "-1", "-i", str(self.clip),
             "-an", "-c:v", "mpeg2video", "-q:v", "5", "-f", "mpegts", "-listen", "1", self.url],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class RtspRelay:
    """A minimal RTSP server on 127.0.0.1 relaying ffmpeg's RTP stream to one TCP client."""

    def __init__(self, clip: Path, port: int, workdir: Path):
        self.clip, self.port, self.workdir = clip, port, workdir
        self.url = f"rtsp://127.0.0.1:{port}/live"
        self.proc = None
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()

    def _udp_pair(self) -> tuple[socket.socket, socket.socket]:
        for _ in range(50):
            rtp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            rtp.bind(("127.0.0.1", 0))
            rtcp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                rtcp.bind(("127.0.0.1", rtp.getsockname()[1] + 1))
                return rtp, rtcp
            except OSError:
                rtp.close()
                rtcp.close()
        raise RuntimeError("no free UDP port pair")

    def start(self) -> None:
        self._stop.clear()
        self.rtp, self.rtcp = self._udp_pair()
        for s in (self.rtp, self.rtcp):
            s.settimeout(0.2)
        sdp = self.workdir / "stream.sdp"
        sdp.unlink(missing_ok=True)
        port = self.rtp.getsockname()[1]
        self.proc = subprocess.Popen(
            ["ffmpeg", "-hide_banner", "-loglevel", "error", "-re", "-stream_loop", "-1", "-i", str(self.clip),
             "-an", "-c:v", "copy", "-f", "rtp", "-sdp_file", str(sdp),
             f"rtp://127.0.0.1:{port}?rtcpport={port + 1}&pkt_size=1200"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not (sdp.exists() and "m=video" in sdp.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.sdp = sdp.read_text().replace("\n", "\r\n") if sdp.exists() else ""
        assert "m=video" in self.sdp, "ffmpeg wrote no SDP"
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", self.port))
        self.listener.listen(4)
        self.listener.settimeout(0.2)
        self._socks = [self.rtp, self.rtcp, self.listener]
        self._spawn(self._accept)

    def _spawn(self, fn, *args) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True)
        t.start()
        self._threads.append(t)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                continue
            self._socks.append(conn)
            self._spawn(self._session, conn)

    def _session(self, conn: socket.socket) -> None:
        lock, buf = threading.Lock(), b""
        conn.settimeout(0.2)
        while not self._stop.is_set():
            try:
                data = conn.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                return
            buf += data
            while True:
                if buf[:1] == b"$":  # client's interleaved RTCP: skip it
                    if len(buf) < 4 or len(buf) < 4 + int.from_bytes(buf[2:4], "big"):
                        break
                    buf = buf[4 + int.from_bytes(buf[2:4], "big"):]
                    continue
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    break
                request, buf = buf[:end].decode(errors="replace"), buf[end + 4:]
                try:
                    self._answer(conn, lock, request)
                except OSError:  # the client went away mid-answer
                    return

    def _answer(self, conn, lock, request: str) -> None:
        lines = request.split("\r\n")
        method = lines[0].split(" ")[0]
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        extra, body = [], ""
        if method == "OPTIONS":
            extra = ["Public: OPTIONS, DESCRIBE, SETUP, PLAY, TEARDOWN, GET_PARAMETER"]
        elif method == "DESCRIBE":
            body = self.sdp.replace("m=video", "a=control:*\r\nm=video", 1).rstrip("\r\n") + \
                "\r\na=control:trackID=0\r\n"
            extra = [f"Content-Base: {self.url}/", "Content-Type: application/sdp"]
        elif method == "SETUP":
            if "TCP" not in headers.get("transport", ""):
                self._send(conn, lock, f"RTSP/1.0 461 Unsupported Transport\r\nCSeq: {headers.get('cseq')}\r\n\r\n")
                return
            extra = ["Transport: RTP/AVP/TCP;unicast;interleaved=0-1", "Session: 1234567"]
        elif method == "PLAY":
            extra = ["Session: 1234567", "Range: npt=0.000-"]
        head = ["RTSP/1.0 200 OK", f"CSeq: {headers.get('cseq', '0')}", *extra]
        if body:
            head.append(f"Content-Length: {len(body.encode())}")
        self._send(conn, lock, "\r\n".join(head) + "\r\n\r\n" + body)
        if method == "PLAY":
            self._spawn(self._relay, conn, lock, self.rtp, 0)
            self._spawn(self._relay, conn, lock, self.rtcp, 1)

    def _send(self, conn, lock, text: str | bytes) -> None:
        with lock:
            conn.sendall(text.encode() if isinstance(text, str) else text)

    def _relay(self, conn, lock, udp: socket.socket, channel: int) -> None:
        while not self._stop.is_set():
            try:
                packet = udp.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                self._send(conn, lock, b"$" + bytes([channel]) + len(packet).to_bytes(2, "big") + packet)
            except OSError:
                return

    def stop(self) -> None:
        self._stop.set()
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for s in self._socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        for t in self._threads:
            t.join(5)
        self._threads.clear()


def wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def exercise_restarts(server, tmp_path: Path) -> None:
    """Run the pipeline on `server.url`; kill and restart the server RESTARTS times."""
    stats, stop = Stats(), threading.Event()
    src = Source(server.url, stats, backoff=(0.2, 1.0), timeout_ms=3000)
    result: dict = {}
    server.start()
    runner = threading.Thread(target=lambda: result.update(run_pipeline(
        Path(tmp_path / "m" / "tiny.onnx"), src, sinks=[f"jsonl:{tmp_path}/live.jsonl"],
        stop_event=stop, stats=stats)), daemon=True)
    runner.start()
    try:
        wait_for(lambda: stats.counters["frames"] >= 5, 20, "first frames")
        for k in range(1, RESTARTS + 1):
            server.stop()
            wait_for(lambda k=k: stats.counters["source_drops"] >= k, 10, f"drop {k} to be noticed")
            time.sleep(0.5)  # the runtime retries against a dead server for a while
            before = stats.counters["frames"]
            server.start()
            wait_for(lambda k=k: stats.counters["reconnects"] >= k, 15, f"reconnect {k}")
            wait_for(lambda b=before: stats.counters["frames"] >= b + 5, 15, f"frames after restart {k}")
    finally:
        stop.set()
        runner.join(20)
        server.stop()
    assert not runner.is_alive()
    assert result["reconnects"] == RESTARTS and result["source_drops"] == RESTARTS
    assert result["source_error"] is None and result["stopped_by"] == "stop requested"
    lines = (tmp_path / "live.jsonl").read_text().splitlines()
    assert len(lines) == result["frames"]


@pytest.fixture
def live_setup(tiny_onnx, tmp_path):
    (tmp_path / "m").mkdir()
    for suffix in (".onnx", ".json"):
        (tmp_path / "m" / f"tiny{suffix}").symlink_to(tiny_onnx.with_suffix(suffix))
    return write_video(tmp_path / "clip.mp4", n=40, fourcc="mp4v", fps=20)


@pytest.mark.timeout(90)
def test_http_stream_reconnects_after_each_server_restart(live_setup, tmp_path):
    exercise_restarts(HttpServer(live_setup, free_port()), tmp_path)


@pytest.mark.timeout(90)
def test_rtsp_stream_reconnects_after_each_server_restart(live_setup, tmp_path):
    exercise_restarts(RtspRelay(live_setup, free_port(), tmp_path), tmp_path)


@pytest.mark.timeout(90)
def test_stream_lost_for_good_says_why_the_run_stopped(live_setup, tmp_path):
    server = HttpServer(live_setup, free_port())
    stats = Stats()
    src = Source(server.url, stats, max_reconnects=5, backoff=(0.2, 0.5), timeout_ms=3000)
    result: dict = {}
    server.start()
    runner = threading.Thread(target=lambda: result.update(run_pipeline(
        Path(tmp_path / "m" / "tiny.onnx"), src, sinks=[f"jsonl:{tmp_path}/live.jsonl"], stats=stats)),
        daemon=True)
    runner.start()
    try:
        wait_for(lambda: stats.counters["frames"] >= 5, 20, "first frames")
        server.stop()  # and it never comes back
        runner.join(30)
    finally:
        server.stop()
    assert not runner.is_alive()
    assert result["stopped_by"] == "source lost: 6 reconnect attempts failed (--max-reconnects 5)"
    assert "6 reconnect attempts failed" in result["source_error"] and server.url in result["source_error"]
    assert result["source_drops"] == 1 and result["frames"] >= 5
