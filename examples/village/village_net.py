"""The game's network side: an asyncio loop on its own thread, talking to the npc-voice server
through `npc_voice.client.NPCVoiceClient`. The pygame loop never waits on the socket: it hands
commands over with `open/close/send_audio` (thread-safe) and takes events with `poll()`.

While a session is live, a sender task sends exactly one 80 ms chunk every 80 ms (real time):
the player's audio when some is waiting, silence otherwise (the protocol wants audio to keep
flowing; the model hears silence between the player's words).
"""

from __future__ import annotations

import asyncio
import collections
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from npc_voice.client import AudioFrame, Ended, ErrorMsg, NPCVoiceClient, NPCVoiceError, State, Text, Visemes
from npc_voice.protocol import MODEL_RATE as RATE, frame_samples

CHUNK = frame_samples(RATE)  # one 80 ms frame at the session's rate
MAX_INPUT_S = 12.0  # player audio waiting to be sent (a prepared line is ~4 s); beyond it the oldest goes


@dataclass
class NetEvent:
    """What the network thread tells the game. kind: opening, started, audio, text, state, visemes
    (data: jaw, visemes), ended, error."""

    kind: str
    session: int  # the game's own conversation number (events of an older one are stale)
    character: str = ""
    frame: int = 0
    pcm: np.ndarray | None = None
    text: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    at: float = field(default_factory=time.monotonic)  # when it arrived (audio is scheduled from it)


class VoiceLink:
    """One websocket connection, one conversation at a time (the player talks to one NPC)."""

    def __init__(self, url: str, token: str | None = None, seed: int | None = None):
        self.url, self.token, self.seed = url, token, seed
        self.visemes = True  # the mouth track; off after a server says it has none (--no-visemes)
        self.events: queue.Queue[NetEvent] = queue.Queue()
        self._input: collections.deque[np.ndarray] = collections.deque()
        self._input_lock = threading.Lock()
        self._input_samples = 0
        self.input_dropped = 0  # samples of player audio dropped (more than MAX_INPUT_S waiting)
        self.sent_chunks = 0
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="village-net", daemon=True)
        self._commands: asyncio.Queue[tuple[str, Any]] | None = None
        self._ready = threading.Event()
        self._counter = 0

    # --- called from the game thread ----------------------------------------------------------

    def start(self) -> VoiceLink:
        self._thread.start()
        self._ready.wait(5)
        return self

    def open(self, character: str) -> int:
        """Starts a conversation with `character`; returns its number (events carry it)."""
        self._counter += 1
        self._command("open", (self._counter, character))
        return self._counter

    def close(self) -> None:
        self._command("close", None)
        self.clear_input()

    def send_audio(self, samples: np.ndarray) -> None:
        """Player audio, float32 in [-1, 1] at 24 kHz, any length: queued, sent in real time."""
        if samples.size == 0:
            return
        with self._input_lock:
            self._input.append(samples.astype(np.float32, copy=False))
            self._input_samples += samples.size
            while self._input_samples > MAX_INPUT_S * RATE and len(self._input) > 1:
                old = self._input.popleft()
                self._input_samples -= old.size
                self.input_dropped += old.size

    def clear_input(self) -> None:
        with self._input_lock:
            self._input.clear()
            self._input_samples = 0

    @property
    def input_pending_s(self) -> float:
        return self._input_samples / RATE

    def poll(self) -> list[NetEvent]:
        out = []
        while True:
            try:
                out.append(self.events.get_nowait())
            except queue.Empty:
                return out

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        self._command("quit", None)
        self._thread.join(10)

    # --- the network thread ---------------------------------------------------------------------

    def _command(self, kind: str, arg: Any) -> None:
        if self._commands is None:
            raise RuntimeError("VoiceLink not started")
        self.loop.call_soon_threadsafe(self._commands.put_nowait, (kind, arg))

    def _take_chunk(self) -> np.ndarray:
        out = np.zeros(CHUNK, np.float32)
        filled = 0
        with self._input_lock:
            while filled < CHUNK and self._input:
                head = self._input[0]
                n = min(CHUNK - filled, head.size)
                out[filled:filled + n] = head[:n]
                filled += n
                if n == head.size:
                    self._input.popleft()
                else:
                    self._input[0] = head[n:]
                self._input_samples -= n
        return out

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._main())
        self.loop.close()

    async def _main(self) -> None:
        self._commands = asyncio.Queue()
        self._ready.set()
        client: NPCVoiceClient | None = None
        session = None
        number = 0
        tasks: list[asyncio.Task[None]] = []

        async def end_session() -> None:
            nonlocal session
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            tasks.clear()
            if session is not None and session.ended is None:
                try:
                    ended = await session.end(timeout=5)
                    self.events.put(NetEvent("ended", number, session.character, data=ended.model_dump()))
                except (NPCVoiceError, ConnectionError, asyncio.TimeoutError) as exc:
                    self.events.put(NetEvent("ended", number, session.character, data={"reason": str(exc)}))
            session = None

        while True:
            kind, arg = await self._commands.get()
            if kind == "quit":
                await end_session()
                break
            if kind == "close":
                await end_session()
                continue
            if kind == "open":
                await end_session()
                number, character = arg
                # a newer open or a close already waiting makes this one moot
                if any(k in ("open", "close", "quit") for k, _ in list(self._commands._queue)):  # type: ignore[attr-defined]
                    continue
                self.events.put(NetEvent("opening", number, character))
                try:
                    if client is None or client.ws is None or client.ws.state.name != "OPEN":
                        client = await NPCVoiceClient(self.url, self.token).connect()
                    try:
                        session = await client.start(character, seed=self.seed, visemes=self.visemes)
                    except NPCVoiceError as exc:  # a server started with --no-visemes: talk without a mouth track
                        if exc.code != "visemes_unavailable":
                            raise
                        self.visemes = False
                        session = await client.start(character, seed=self.seed, visemes=False)
                except (NPCVoiceError, OSError, ConnectionError, asyncio.TimeoutError) as exc:
                    code = getattr(exc, "code", type(exc).__name__)
                    self.events.put(NetEvent("error", number, character, text=f"{code}: {exc}"))
                    client = None if not isinstance(exc, NPCVoiceError) else client
                    session = None
                    continue
                self.clear_input()
                self.events.put(NetEvent("started", number, character, data=session.started.model_dump()))
                tasks[:] = [asyncio.create_task(self._pump(session, number)),
                            asyncio.create_task(self._send(session))]
        if client is not None:
            await client.close()

    async def _pump(self, session: Any, number: int) -> None:
        async for event in session.events():
            if isinstance(event, AudioFrame):
                self.events.put(NetEvent("audio", number, session.character, frame=event.frame, pcm=event.pcm))
            elif isinstance(event, Text):
                self.events.put(NetEvent("text", number, session.character, frame=event.frame, text=event.text))
            elif isinstance(event, Visemes):  # the mouth track of frame `frame` (just before its audio)
                self.events.put(NetEvent("visemes", number, session.character, frame=event.frame,
                                         data={"jaw": event.jaw, "visemes": event.visemes, "step_ms": event.step_ms}))
            elif isinstance(event, State):
                self.events.put(NetEvent("state", number, session.character, frame=event.frame, text=event.state))
            elif isinstance(event, ErrorMsg):
                self.events.put(NetEvent("error", number, session.character, text=f"{event.code}: {event.message}"))
            elif isinstance(event, Ended):
                self.events.put(NetEvent("ended", number, session.character, data=event.model_dump()))
        if session.ended is None:  # the connection went away
            self.events.put(NetEvent("ended", number, session.character, data={"reason": "connection closed"}))

    async def _send(self, session: Any) -> None:
        """One 80 ms chunk every 80 ms, paced by the clock (catching up at most a few chunks)."""
        t0 = time.monotonic()
        sent = 0
        while session.ended is None:
            due = t0 + sent * CHUNK / RATE
            now = time.monotonic()
            if now < due:
                await asyncio.sleep(due - now)
            elif now - due > 0.4:  # we were stalled: do not burst, start the clock again
                t0, sent = now, 0
            try:
                await session.send_audio(self._take_chunk())
            except Exception:  # the connection closed; _pump reports it
                return
            sent += 1
            self.sent_chunks += 1
