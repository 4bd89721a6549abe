"""An asyncio client for `npc-voice serve` (docs/protocol.md).

    async with NPCVoiceClient("ws://127.0.0.1:8765/ws", token=...) as client:
        session = await client.start(character="innkeeper")
        await session.send_audio(pcm)            # float32 in [-1, 1] or int16, at session.sample_rate
        async for event in session.events():     # AudioFrame, Text, State, Switched, Dropped, ErrorMsg, Ended
            ...
        await session.switch("blacksmith")       # hot swap: returns the `switched` message
        await session.say("Welcome, traveller!") # a scripted line, forced into the NPC's text stream
        await session.end()                      # returns the `ended` message

One connection holds one session at a time (start another after `end`). Events are kept in a
bounded queue per session: a consumer that falls far behind loses the oldest audio frames first
(`session.dropped_events` counts them).

The client plays nothing itself; a program that plays the NPC's frames schedules them with a
`PlayoutClock` (frame n at t0 + n * 80 ms on its own clock, re-anchored when the server's schedule
shifts, so that a server hiccup never becomes lasting latency: docs/protocol.md, "Playout").
"""

from __future__ import annotations

import asyncio
import base64
import collections
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

import numpy as np

from .audio import float_to_pcm16, pcm16_to_float, wav_bytes
from .protocol import (
    FRAME_SECONDS, MODEL_RATE, WS_PATH, Dropped, Ended, ErrorMsg, Hello, InlineCharacter, ServerMessage, Started, State,
    Switched, Text, decode_audio_frame, parse_server_text,
)

__all__ = [
    "AudioFrame", "ClientSession", "Dropped", "Ended", "ErrorMsg", "NPCVoiceClient", "NPCVoiceError", "PlayoutClock",
    "State", "Switched", "Text", "inline_character",
]


class NPCVoiceError(Exception):
    """The server refused a request: `code` is the protocol's stable error code."""

    def __init__(self, code: str, message: str, ref: Any = None):
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.ref = code, message, ref


@dataclass
class AudioFrame:
    """One 80 ms frame of the NPC's voice; play frame n at start + n * 80 ms (a gap in `frame`
    means frames the server dropped because this client read too slowly)."""

    frame: int
    pcm: np.ndarray  # int16, session.frame_samples samples
    sample_rate: int

    @property
    def time(self) -> float:
        return self.frame * FRAME_SECONDS

    def float32(self) -> np.ndarray:
        return pcm16_to_float(self.pcm)


Event = AudioFrame | Text | State | Switched | Dropped | ErrorMsg | Ended


class PlayoutClock:
    """When to play each NPC frame, on the client's own clock (seconds, e.g. `time.monotonic()`).

    Frame n plays at `t0 + n * 80 ms`; the first frame anchors t0 `buffer_s` (the jitter buffer)
    after its arrival. `place(frame, now)` is called as each frame arrives and re-anchors when the
    server's schedule has shifted, so a hiccup costs one glitch, never lasting latency:
    - a frame that arrives after its play time (later than the jitter buffer allows: the server fell
      behind and restarted its schedule) moves t0 later, so that it plays `buffer_s` from now; the
      player plays silence up to there (one gap) instead of every later frame being late;
    - frames that keep arriving more than `slack_s` earlier than the jitter buffer needs, for
      `settle_s` (after a catch-up burst the buffer holds more than it should) move t0 earlier by
      whole frames: `place` returns that number of frames, which the player skips (drops the oldest
      it holds) to get back to `buffer_s` of latency. A momentary burst changes nothing.
    """

    def __init__(self, buffer_s: float = 0.15, slack_s: float = FRAME_SECONDS, settle_s: float = 1.0):
        self.buffer_s, self.slack_s, self.settle_s = buffer_s, slack_s, settle_s
        self.t0: float | None = None
        self.late_resyncs = self.early_resyncs = self.skipped_frames = 0
        self._early_since: float | None = None
        self._recent: collections.deque[tuple[float, float]] = collections.deque()  # (arrival, ahead) of early frames

    def due(self, frame: int) -> float:
        """When frame `frame` plays (after a `place`)."""
        assert self.t0 is not None, "no frame placed yet"
        return self.t0 + frame * FRAME_SECONDS

    def reset(self) -> None:
        """A new session, or the player starts over (an underrun): the next frame anchors again."""
        self.t0, self._early_since = None, None
        self._recent.clear()

    def place(self, frame: int, now: float) -> int:
        """Frame `frame` arrived at `now`: re-anchors if needed; returns the frames to skip (0 mostly)."""
        if self.t0 is None or now > self.due(frame):
            if self.t0 is not None:
                self.late_resyncs += 1
            self.t0 = now + self.buffer_s - frame * FRAME_SECONDS
            self._early_since = None
            self._recent.clear()
            return 0
        ahead = self.due(frame) - now - self.buffer_s  # beyond what the jitter buffer needs
        if ahead <= self.slack_s:
            self._early_since = None
            self._recent.clear()
            return 0
        if self._early_since is None:
            self._early_since = now
        self._recent.append((now, ahead))
        while self._recent[0][0] < now - self.settle_s:
            self._recent.popleft()
        if now - self._early_since < self.settle_s:
            return 0
        skip = int(min(a for _, a in self._recent) / FRAME_SECONDS + 1e-9)
        if skip:
            self.t0 -= skip * FRAME_SECONDS
            self.early_resyncs += 1
            self.skipped_frames += skip
        self._early_since = None
        self._recent.clear()
        return skip


def inline_character(role: str, voice: bytes | str | Path | np.ndarray | None = None, *, preset: str | None = None,
                     name: str = "npc", sample_rate: int = MODEL_RATE) -> dict[str, Any]:
    """An inline character for `start`/`switch`: a role and a voice (WAV/FLAC/OGG bytes or file,
    float samples at `sample_rate`, or a preset name known to the server)."""
    if (voice is None) == (preset is None):
        raise ValueError("give a voice sample or a preset name")
    if preset is not None:
        return {"role": role, "name": name, "voice": {"preset": preset}}
    if isinstance(voice, np.ndarray):
        data = wav_bytes(voice, sample_rate)
    elif isinstance(voice, (str, Path)):
        data = Path(voice).read_bytes()
    else:
        data = bytes(voice)
    return {"role": role, "name": name, "voice": {"wav_base64": base64.b64encode(data).decode("ascii")}}


class _Events:
    """A bounded event queue: beyond `maxlen`, the oldest audio frame (else the oldest event) goes."""

    def __init__(self, maxlen: int):
        self.maxlen = maxlen
        self.items: collections.deque[Any] = collections.deque()
        self.ready = asyncio.Event()
        self.dropped = 0
        self.closed = False

    def put(self, item: Any) -> None:
        self.items.append(item)
        if len(self.items) > self.maxlen:
            for i, old in enumerate(self.items):
                if isinstance(old, AudioFrame):
                    del self.items[i]
                    break
            else:
                self.items.popleft()
            self.dropped += 1
        self.ready.set()

    def close(self) -> None:
        self.closed = True
        self.ready.set()

    async def get(self) -> Any | None:
        while not self.items:
            if self.closed:
                return None
            self.ready.clear()
            await self.ready.wait()
        return self.items.popleft()


class ClientSession:
    """A live conversation with one NPC (create it with `NPCVoiceClient.start`)."""

    def __init__(self, client: NPCVoiceClient, started: Started, max_events: int):
        self.client = client
        self.id, self.character = started.session, started.character
        self.sample_rate, self.frame_samples = started.sample_rate, started.frame_samples
        self.started = started
        self._events = _Events(max_events)
        self.ended: Ended | None = None

    @property
    def dropped_events(self) -> int:
        return self._events.dropped

    async def send_audio(self, pcm: np.ndarray | bytes) -> None:
        """User audio at `sample_rate`, any length: float samples in [-1, 1], int16, or PCM16 LE bytes."""
        if isinstance(pcm, np.ndarray):
            if pcm.dtype != np.int16:
                pcm = float_to_pcm16(pcm)
            pcm = pcm.astype("<i2", copy=False).tobytes()
        await self.client.ws.send(pcm)

    async def events(self) -> AsyncIterator[Event]:
        """Every event of this session, in order, up to and including `Ended` (or the connection's end)."""
        while True:
            item = await self._events.get()
            if item is None:
                return
            yield item
            if isinstance(item, Ended):
                return

    async def next_event(self, timeout: float | None = None) -> Event | None:
        return await asyncio.wait_for(self._events.get(), timeout)

    async def switch(self, character: str | dict[str, Any] | InlineCharacter, timeout: float = 30.0) -> Switched:
        """Another character for this NPC (the conversation starts over); returns once it speaks."""
        return await self.client._request({"type": "switch", "character": _character(character)}, timeout)

    async def say(self, text: str) -> None:
        """Makes the NPC say `text` (forced into its text stream, one token every 3 frames)."""
        await self.client._send_json({"type": "say", "text": text})

    async def end(self, timeout: float = 10.0) -> Ended:
        if self.ended is not None:
            return self.ended
        return await self.client._request({"type": "end"}, timeout)


def _character(character: str | dict[str, Any] | InlineCharacter) -> Any:
    return character.model_dump() if isinstance(character, InlineCharacter) else character


class NPCVoiceClient:
    """One websocket connection to an npc-voice server. `url`: ws://host:port (the /ws path is added
    when missing). `token`: sent as `Authorization: Bearer`."""

    def __init__(self, url: str, token: str | None = None, *, max_events: int = 4096, open_timeout: float = 10.0,
                 **connect_kwargs: Any):
        if url.rstrip("/").count("/") == 2:  # ws://host:port
            url = url.rstrip("/") + WS_PATH
        self.url, self.token = url, token
        self.max_events, self.open_timeout = max_events, open_timeout
        self.connect_kwargs = connect_kwargs
        self.ws: Any = None
        self.hello: Hello | None = None
        self.session: ClientSession | None = None
        self.errors: list[ErrorMsg] = []  # errors outside a session and without a pending request
        self._pending: dict[Any, asyncio.Future[Any]] = {}
        self._refs = itertools.count(1)
        self._reader: asyncio.Task[None] | None = None
        self._hello = None

    async def connect(self) -> NPCVoiceClient:
        from websockets.asyncio.client import connect

        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        kwargs = {"max_size": 4 << 20, "compression": None, "open_timeout": self.open_timeout} | self.connect_kwargs
        self.ws = await connect(self.url, additional_headers=headers, **kwargs)
        self._hello = asyncio.get_running_loop().create_future()
        self._reader = asyncio.create_task(self._read_loop())
        self.hello = await asyncio.wait_for(asyncio.shield(self._hello), self.open_timeout)
        return self

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)

    async def __aenter__(self) -> NPCVoiceClient:
        return await self.connect()

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def start(self, character: str | dict[str, Any] | InlineCharacter, *, sample_rate: int = MODEL_RATE,
                    seed: int | None = None, timeout: float = 60.0) -> ClientSession:
        """Starts a conversation; returns when the NPC's first frame is on its way."""
        msg: dict[str, Any] = {"type": "start", "character": _character(character), "sample_rate": sample_rate}
        if seed is not None:
            msg["seed"] = seed
        await self._request(msg, timeout)
        assert self.session is not None
        return self.session

    # --- internals ------------------------------------------------------------------------------

    async def _send_json(self, msg: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(msg))

    async def _request(self, msg: dict[str, Any], timeout: float) -> Any:
        ref = next(self._refs)
        future = asyncio.get_running_loop().create_future()
        self._pending[ref] = future
        try:
            await self._send_json(msg | {"ref": ref})
            return await asyncio.wait_for(future, timeout)
        finally:
            self._pending.pop(ref, None)

    def _resolve(self, msg: Any) -> bool:
        ref = getattr(msg, "ref", None)
        future = self._pending.get(ref) if ref is not None else None
        if future is None or future.done():
            return False
        if isinstance(msg, ErrorMsg):
            future.set_exception(NPCVoiceError(msg.code, msg.message, ref))
        else:
            future.set_result(msg)
        return True

    async def _read_loop(self) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            async for data in self.ws:
                if isinstance(data, bytes):
                    if self.session is not None:
                        frame, pcm = decode_audio_frame(data)
                        self.session._events.put(AudioFrame(frame, pcm, self.session.sample_rate))
                    continue
                msg: ServerMessage = parse_server_text(data)
                if isinstance(msg, Hello):
                    if not self._hello.done():
                        self._hello.set_result(msg)
                    continue
                if isinstance(msg, Started):
                    self.session = ClientSession(self, msg, self.max_events)
                    self._resolve(msg)
                    continue
                session = self.session
                if isinstance(msg, Ended) and session is not None:
                    session.ended = msg
                    session._events.put(msg)
                    self.session = None
                    self._resolve(msg)
                    continue
                resolved = self._resolve(msg)
                if isinstance(msg, ErrorMsg) and resolved:
                    continue  # raised by the request that caused it
                if session is not None:
                    session._events.put(msg)
                elif isinstance(msg, ErrorMsg):
                    self.errors.append(msg)
        except ConnectionClosed:
            pass
        finally:
            error = ConnectionError("the connection to the npc-voice server closed")
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(error)
            if self._hello is not None and not self._hello.done():
                self._hello.set_exception(error)
            if self.session is not None:
                self.session._events.close()
