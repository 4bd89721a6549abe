"""Shared by the tests of npc_voice/serve/ (tests/test_serve_*.py): generated voices, the `tiny`
model, a real server on 127.0.0.1 with real websocket clients (one per test module that asks for
it), a well-behaved witness client and raw websocket helpers (docs/protocol.md)."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from npc_voice.client import AudioFrame, NPCVoiceClient
from npc_voice.engine import Engine, PrefixCache
from npc_voice.model.generator import Generator
from npc_voice.model.loading import LoadedModel, random_model
from npc_voice.protocol import Dropped, ErrorMsg, State, Text
from npc_voice.serve import BackgroundServer, ServerConfig
from conftest import stream_silence


REPO = Path(__file__).resolve().parents[1]
CAST = REPO / "characters"
RATE = 24_000


def tone(seconds: float, freq: float, rate: int = RATE, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * freq * t) * (1 + 0.3 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)


def run(coro, timeout: float = 90.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    torch.set_num_threads(1)  # 2-core machine: the engine thread on one core, the clients on the other
    return random_model("tiny", seed=3)


@pytest.fixture(scope="module")
def cache(model: LoadedModel) -> PrefixCache:
    return PrefixCache(model, Generator(model.lm))  # shared by every engine here: each character built once


@pytest.fixture(scope="module")
def store():
    from npc_voice.characters import CharacterStore

    return CharacterStore(CAST)


def make_server(model, cache, store, slots: int = 2, **config) -> BackgroundServer:
    return BackgroundServer(Engine(model, slots=slots, cache=cache), ServerConfig(port=0, **config), store).start()


@pytest.fixture(scope="module")
def server(model, cache, store):
    bg = make_server(model, cache, store, slots=2, idle_timeout=20.0)
    yield bg
    bg.stop()


def health(bg: BackgroundServer) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{bg.server.port}/health", timeout=5) as r:
        assert r.headers["Content-Type"] == "application/json"
        return json.load(r)


def wait_idle(bg: BackgroundServer, timeout: float = 5.0) -> None:
    """Until no session is left from a previous test (closes apply at the engine's next tick)."""
    deadline = time.monotonic() + timeout
    while bg.server.manager.reserved or bg.server.engine.sessions:
        assert time.monotonic() < deadline, "sessions left over"
        time.sleep(0.02)


class Witness:
    """A well-behaved client streaming real-time audio on its own connection: what bad clients do
    elsewhere must not touch it (no error, no gap, real-time frames)."""

    def __init__(self, url: str, character="innkeeper", token: str | None = None):
        self.url, self.character, self.token = url, character, token
        self.frames: list[tuple[float, int]] = []
        self.other: list = []
        self.ready = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        async with NPCVoiceClient(self.url, token=self.token) as client:
            session = await client.start(self.character)
            self.ready.set()

            feeder = asyncio.create_task(stream_silence(session))
            async for event in session.events():
                if isinstance(event, AudioFrame):
                    self.frames.append((time.monotonic(), event.frame))
                elif not isinstance(event, (Text, State)):
                    self.other.append(event)
                if stop.is_set():
                    break
            feeder.cancel()
            await session.end()

    def check(self, since: float, timing) -> None:
        """Whatever the load: every frame in order, no error or drop. Timing: real-time frames since `since`."""
        indexes = [f for _, f in self.frames]
        assert indexes == list(range(len(indexes))), "the witness lost frames"
        assert not [e for e in self.other if isinstance(e, (ErrorMsg, Dropped))], self.other
        recent = [t for t, _ in self.frames if t >= since]
        span = self.frames[-1][0] - since
        timing.check(len(recent) >= 0.85 * span / 0.08 - 2, f"the witness got {len(recent)} frames in {span:.2f} s")


def collect_until(predicate, events: list):
    async def inner(session):
        async for event in session.events():
            events.append(event)
            if predicate(event):
                return event
    return inner


async def recv_json(ws, timeout: float = 10.0) -> dict:
    """The next JSON message (audio frames skipped)."""
    deadline = time.monotonic() + timeout
    while True:
        data = await asyncio.wait_for(ws.recv(), max(0.01, deadline - time.monotonic()))
        if isinstance(data, str):
            return json.loads(data)


async def expect(ws, kind: str, code: str | None = None, **fields) -> dict:
    while True:
        msg = await recv_json(ws)
        if msg["type"] in ("text", "state", "dropped"):
            continue
        assert msg["type"] == kind, msg
        if code is not None:
            assert msg["code"] == code, msg
        for key, value in fields.items():
            assert msg[key] == value, msg
        return msg


async def _next_binary(ws) -> bytes:
    while True:
        data = await ws.recv()
        if isinstance(data, bytes):
            return data
