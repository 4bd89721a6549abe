"""deploy/haproxy.cfg with real components: the `haproxy` binary (started here with the file,
only its bind, stats socket, server lines and check intervals replaced for test ports) in front of
three `npc-voice serve` processes (tiny model, CPU, 2 slots each, one shared characters folder and
one shared --prefix-cache folder), and real clients (npc_voice.client) through it.

The agent checks (--agent-port) spread 6 conversations 2/2/2 and drain full servers, so a 7th gets
the documented handshake refusal `server_busy`; SIGTERM drains one server (--drain-grace): its
clients get `shutting_down` and come back through HAProxy to the others once slots free up, while
the other conversations never lose a frame. .ci/run installs haproxy; elsewhere the test skips
without it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from npc_voice.client import AudioFrame, Dropped, Ended, ErrorMsg, NPCVoiceClient, NPCVoiceError

REPO = Path(__file__).resolve().parents[1]
TOKEN = "haproxy-test-token-0123456789"
CHARACTERS = ["innkeeper", "blacksmith"]

pytestmark = [pytest.mark.realtime, pytest.mark.skipif(
    shutil.which("haproxy") is None and not os.environ.get("CI"), reason="haproxy is not installed (.ci/run installs it)")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def haproxy_config(port: int, stats: Path, servers: list[tuple[int, int]]) -> str:
    """deploy/haproxy.cfg for 127.0.0.1: `port`, the stats socket, (ws port, agent port) per server."""
    text = (REPO / "deploy" / "haproxy.cfg").read_text()
    text = re.sub(r"(?m)^(\s*)stats socket \S+", rf"\1stats socket {stats}", text)
    text = re.sub(r"(?m)^(\s*)bind \S+", rf"\1bind 127.0.0.1:{port}", text)
    text = re.sub(r"\binter 2s\b", "inter 300ms", text)
    text = re.sub(r"\bagent-inter 1s\b", "agent-inter 150ms", text)
    text = re.sub(r"\brise 2\b", "rise 1", text)
    lines = [line for line in text.splitlines() if not line.strip().startswith("server ")]
    lines += [f"    server npc{i + 1} 127.0.0.1:{ws} agent-port {agent}" for i, (ws, agent) in enumerate(servers)]
    return "\n".join(lines) + "\n"


def haproxy_stat(sock: Path) -> dict[str, dict[str, str]]:
    """`show stat` of the backend's servers: name -> row (status, weight, scur...)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(sock))
        s.sendall(b"show stat\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    rows = data.decode().lstrip("# ").splitlines()
    head = rows[0].split(",")
    out = {}
    for row in rows[1:]:
        cells = dict(zip(head, row.split(",")))
        if cells.get("pxname") == "npc_voice_servers" and cells.get("svname", "").startswith("npc"):
            out[cells["svname"]] = cells
    return out


def wait_for(what: str, ok, state=None, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {state() if state else ''}"
        time.sleep(0.05)


def health(port: int) -> dict:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
            return json.load(r)
    except urllib.error.HTTPError as exc:  # 503 while stopping: still the JSON document
        return json.load(exc)


class Talk:
    """One client's conversation through HAProxy: streams silence at real time, records every event."""

    def __init__(self, port: int):
        self.client = NPCVoiceClient(f"ws://127.0.0.1:{port}", TOKEN)
        self.frames: list[int] = []
        self.events: list = []
        self.tasks: list[asyncio.Task] = []
        self.session = None

    async def open(self, character: str) -> Talk:
        await self.client.connect()
        self.session = await self.client.start(character, seed=1)
        self.tasks = [asyncio.create_task(self._send()), asyncio.create_task(self._read())]
        return self

    async def _send(self) -> None:
        import numpy as np

        t0, i = time.monotonic(), 0
        with contextlib.suppress(Exception):
            while True:
                await self.session.send_audio(np.zeros(1920, np.int16))
                i += 1
                await asyncio.sleep(max(0.0, t0 + i * 0.08 - time.monotonic()))

    async def _read(self) -> None:
        async for ev in self.session.events():
            self.events.append(ev)
            if isinstance(ev, AudioFrame):
                self.frames.append(ev.frame)

    def lost_frames(self) -> int:
        gaps = sum(b - a - 1 for a, b in zip(self.frames, self.frames[1:]))
        return gaps + max((ev.output_frames for ev in self.events if isinstance(ev, Dropped)), default=0)  # totals

    async def close(self, end: bool = False) -> None:
        if end and self.session is not None and self.session.ended is None:
            await self.session.end()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.client.close()


async def refused(port: int) -> tuple[int, dict]:
    """A handshake through HAProxy that must be refused: (HTTP status, JSON body); the Python
    client raises it as the `NPCVoiceError` the body names."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus

    with pytest.raises(NPCVoiceError) as refusal:
        await NPCVoiceClient(f"ws://127.0.0.1:{port}", TOKEN).connect()
    with pytest.raises(InvalidStatus) as info:
        await connect(f"ws://127.0.0.1:{port}", additional_headers={"Authorization": f"Bearer {TOKEN}"})
    response = info.value.response
    body = json.loads(response.body)
    assert (refusal.value.code, refusal.value.message) == (body["code"], body["message"])
    return response.status_code, body


def test_three_servers_behind_haproxy(tmp_path, timing):
    assert shutil.which("haproxy"), "haproxy is not installed: .ci/run installs it"
    cache_dir = tmp_path / "prefix-cache"
    servers = [(free_port(), free_port()) for _ in range(3)]
    procs = [subprocess.Popen(
        [sys.executable, "-m", "npc_voice.cli", "serve", "--port", str(ws), "--agent-port", str(agent),
         "--slots", "2", "--threads", "1", "--device", "cpu", "--token", TOKEN, "--drain-grace", "2",
         "--characters", str(REPO / "characters"), "--prefix-cache", str(cache_dir), "--log-level", "WARNING"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for ws, agent in servers]
    hp_port, stats = free_port(), tmp_path / "haproxy.sock"
    (tmp_path / "haproxy.cfg").write_text(haproxy_config(hp_port, stats, servers))
    haproxy = subprocess.Popen(["haproxy", "-db", "-f", str(tmp_path / "haproxy.cfg")],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for proc, (ws, _) in zip(procs, servers):
            wait_for("a server", lambda: proc.poll() is None and _up(ws), timeout=90)
        wait_for("haproxy to see 3 servers UP at full weight", lambda: stats.exists() and [
            (row["status"], row["weight"]) for row in haproxy_stat(stats).values()] == [("UP", "100")] * 3,
            lambda: (haproxy_stat(stats) if stats.exists() else "no stats socket", haproxy.poll()))
        asyncio.run(asyncio.wait_for(_scenario(hp_port, stats, servers, procs, timing), 120))
        assert procs[2].wait(timeout=20) == 0  # the drained server exited cleanly
        # The shared folders: every server read the same cast; the prompt cache holds each character
        # once (written atomically by whichever server built it first, no temp file left behind).
        cached = list(cache_dir.rglob("*"))
        assert len([p for p in cached if p.suffix == ".safetensors"]) == len(CHARACTERS)
        assert not [p for p in cached if ".tmp" in p.name]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            proc.wait(timeout=20)
        haproxy.terminate()
        haproxy.wait(timeout=10)
    timing.verdict()


def _up(port: int) -> bool:
    try:
        return health(port)["status"] == "ok"
    except OSError:
        return False


async def _scenario(hp_port: int, stats: Path, servers, procs, timing) -> None:
    def used(among: int = 3) -> list[int]:
        return [health(ws)["slots"]["used"] for ws, _ in servers[:among]]

    talks: list[Talk] = []
    where: list[int] = []  # each talk's server index, from the servers' /health
    for i in range(6):
        before = used()
        talks.append(await Talk(hp_port).open(CHARACTERS[i % 2]))
        after = used()
        moved = [k for k in range(3) if after[k] == before[k] + 1]
        assert len(moved) == 1, (before, after)
        where.append(moved[0])
    assert used() == [2, 2, 2]
    assert [health(ws)["totals"]["sessions"] for ws, _ in servers] == [2, 2, 2]
    # Every server full: its agent says `drain`, so HAProxy has nowhere to send a 7th conversation.
    await asyncio.to_thread(wait_for, "the agents to drain all three servers", lambda: all(
        row["status"].startswith("DRAIN") for row in haproxy_stat(stats).values()),
        lambda: [(r["status"], r["weight"], r["last_agt"]) for r in haproxy_stat(stats).values()])
    assert await refused(hp_port) == (503, {"type": "error", "code": "server_busy", "message": (
        "every npc-voice server is full or stopping: retry later")})

    # SIGTERM the third server: it drains (new sessions refused), its live sessions go on for the
    # grace period, then end with `shutting_down`.
    gone = [t for t, k in zip(talks, where) if k == 2]
    staying = [t for t, k in zip(talks, where) if k != 2]
    frames_at_term = [len(t.frames) for t in gone]
    procs[2].send_signal(signal.SIGTERM)
    await asyncio.sleep(1.0)
    assert health(servers[2][0])["status"] == "stopping"
    assert all(len(t.frames) > n for t, n in zip(gone, frames_at_term))  # still talking while draining
    for t in gone:
        await asyncio.wait_for(asyncio.gather(*t.tasks[1:], return_exceptions=True), 15)
        errors = [ev for ev in t.events if isinstance(ev, ErrorMsg)]
        assert [(e.code, e.fatal) for e in errors] == [("shutting_down", True)]
        assert [ev.reason for ev in t.events if isinstance(ev, Ended)] == ["shutting_down"]
        await t.close()
    # They come back through HAProxy: refused while the two others are full...
    assert (await refused(hp_port))[1]["code"] == "server_busy"
    # ... and placed once one conversation on each of them ends.
    ending = [next(t for t, k in zip(talks, where) if k == server) for server in (0, 1)]
    for t in ending:
        await t.close(end=True)
    await asyncio.to_thread(wait_for, "the agents to take both servers back", lambda: [
        row["status"] for name, row in sorted(haproxy_stat(stats).items())][:2] == ["UP", "UP"])
    back = [await Talk(hp_port).open(c) for c in CHARACTERS]
    assert used(among=2) == [2, 2]
    await asyncio.sleep(1.0)
    assert all(len(t.frames) > 5 for t in back)

    # The conversations that stayed never lost a frame (the ended ones neither, up to their end).
    for t in staying:
        timing.check(t.lost_frames() == 0, f"a conversation on a live server lost {t.lost_frames()} frames")
        assert t.frames[0] == 0
    for t in [*staying, *back]:
        if t not in ending:
            await t.close(end=True)
