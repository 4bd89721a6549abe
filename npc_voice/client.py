"""An asyncio client for `npc-voice serve` (docs/protocol.md).

    async with NPCVoiceClient("ws://127.0.0.1:8765/ws", token=...) as client:
        session = await client.start(character="innkeeper")
        await session.send_audio(pcm)            # float32 in [-1, 1] or int16, at session.sample_rate
        async for event in session.events():     # AudioFrame, Text, State, Visemes, Switched, Dropped, ErrorMsg, Ended
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
import json
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import numpy as np
from websockets.exceptions import InvalidStatus

from .audio import wav_bytes
from .protocol import (
    FRAME_SECONDS, MODEL_RATE, WS_PATH, Dropped, Ended, ErrorMsg, Hello, InlineCharacter, Started, State, Switched,
    Text, Visemes,
)
# The connection's protocol, without I/O (`ClientSession` there; this module's `ClientSession` is the
# asyncio handle of one conversation, a name kept for the programs that use it).
from .protocol.session import Answer, AudioFrame, StrayError
from .protocol.session import ClientSession as ClientProtocol

__all__ = [
    "AudioFrame", "ClientSession", "Dropped", "Ended", "ErrorMsg", "NPCVoiceClient", "NPCVoiceError", "PlayoutClock",
    "State", "Switched", "Text", "Visemes", "inline_character",
]


class NPCVoiceError(Exception):
    """The server refused a request: `code` is the protocol's stable error code."""

    def __init__(self, code: str, message: str, ref: Any = None):
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.ref = code, message, ref


def handshake_error(exc: InvalidStatus) -> NPCVoiceError:
    """An HTTP refusal of the websocket handshake (401 `unauthorized`, 503 `server_busy` or
    `shutting_down`, ...) as the `NPCVoiceError` its JSON body names (docs/protocol.md)."""
    response = exc.response
    try:
        body = json.loads(response.body or b"")
        return NPCVoiceError(str(body["code"]), str(body.get("message", "")))
    except (ValueError, KeyError, TypeError):
        return NPCVoiceError(f"http_{response.status_code}", f"the server refused the connection: {exc}")


Event = AudioFrame | Text | State | Visemes | Switched | Dropped | ErrorMsg | Ended


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
        self.client.protocol.audio(pcm)
        await self.client._write()

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
        return await self.client._request(lambda: self.client.protocol.switch(character), timeout)

    async def say(self, text: str) -> None:
        """Makes the NPC say `text` (forced into its text stream, one token every 3 frames)."""
        self.client.protocol.say(text)
        await self.client._write()

    async def end(self, timeout: float = 10.0) -> Ended:
        if self.ended is not None:
            return self.ended
        return await self.client._request(self.client.protocol.end, timeout)


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
        self.protocol = ClientProtocol()
        self._pending: dict[Any, asyncio.Future[Any]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._hello = None

    async def connect(self) -> NPCVoiceClient:
        from websockets.asyncio.client import connect

        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        kwargs = {"max_size": 4 << 20, "compression": None, "open_timeout": self.open_timeout} | self.connect_kwargs
        try:
            self.ws = await connect(self.url, additional_headers=headers, **kwargs)
        except InvalidStatus as exc:  # refused at the handshake: the documented JSON body says why
            raise handshake_error(exc) from None
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
                    seed: int | None = None, visemes: bool = False, timeout: float = 60.0) -> ClientSession:
        """Starts a conversation; returns when the NPC's first frame is on its way. `visemes`: the
        session's events include a `Visemes` (the NPC's mouth track) before each `AudioFrame`."""
        await self._request(lambda: self.protocol.start(character, sample_rate, seed, visemes), timeout)
        assert self.session is not None
        return self.session

    # --- internals ------------------------------------------------------------------------------

    async def _write(self) -> None:
        """Writes what the protocol has queued, in order."""
        for data in self.protocol.data_to_send():
            await self.ws.send(data)

    async def _request(self, queue: Callable[[], int], timeout: float) -> Any:
        """Queues a request (`queue` returns its ref), writes it, and waits for its answer."""
        ref = queue()
        future = asyncio.get_running_loop().create_future()
        self._pending[ref] = future
        try:
            await self._write()
            return await asyncio.wait_for(future, timeout)
        finally:
            self._pending.pop(ref, None)
            self.protocol.forget(ref)

    def _answer(self, answer: Answer) -> None:
        future = self._pending.get(answer.ref)
        if future is None or future.done():
            return
        msg = answer.message
        if isinstance(msg, ErrorMsg):
            future.set_exception(NPCVoiceError(msg.code, msg.message, answer.ref))
        else:
            future.set_result(msg)

    def _dispatch(self) -> None:
        """Routes the protocol's events: answers to their requests, the rest to the live session."""
        for event in self.protocol.events_received():
            if isinstance(event, Hello):
                if not self._hello.done():
                    self._hello.set_result(event)
            elif isinstance(event, Started):
                self.session = ClientSession(self, event, self.max_events)
            elif isinstance(event, Answer):
                self._answer(event)
            elif isinstance(event, StrayError):
                self.errors.append(event.message)
            elif self.session is not None:
                self.session._events.put(event)
                if isinstance(event, Ended):
                    self.session.ended = event
                    self.session = None

    async def _read_loop(self) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            async for data in self.ws:
                try:
                    if isinstance(data, bytes):
                        self.protocol.receive_bytes(data)
                    else:
                        self.protocol.receive_text(data)
                except ValueError:  # a message type of a newer server (or a malformed frame): ignored
                    pass
                self._dispatch()
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
