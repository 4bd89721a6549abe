"""`npc-voice serve`: the engine behind a websocket endpoint, for game engines (docs/protocol.md).

Layout (as in the `websockets` library, the protocol itself is I/O-free in `npc_voice.protocol`):
- `NPCVoiceServer`: the asyncio websocket server, the /health endpoint, the engine's real-time loop;
- `SessionManager`: connections and conversation slots (a reservation per live session);
- `Connection`: one client; reads and validates its messages, owns at most one session at a time;
- `Outbox`: the bounded queue between the engine thread and a connection's sender task. The engine
  thread never touches a socket: its listener appends to the outbox (oldest audio dropped and counted
  when a client reads too slowly) and wakes the event loop with `call_soon_threadsafe`, at most one
  pending wake-up per connection, so nothing grows without bound and no client can delay a tick;
- `InputConverter` / `OutputFramer`: the client's rate (16, 24 or 48 kHz) <-> the model's 24 kHz
  (libsoxr streams), and exact 80 ms frames towards the client.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import functools
import hmac
import http
import ipaddress
import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np

from .audio import float_to_pcm16, pcm16_to_float
from .characters import ResolveError, open_store, resolve_persona
from .engine import Engine, EngineFull, EngineLoop, FrameEvent, Persona, Session
from .engine.engine import percentile
from .engine.persona import DEFAULT_CACHE_MB
from .protocol import (
    FRAME_SECONDS, HEALTH_PATH, MODEL_RATE, PROTOCOL_VERSION, WS_PATH, ClientMessage, Dropped, End, Ended,
    ErrorCode, ErrorMsg, Hello, InlineCharacter, Limits, ProtocolError, Say, SpeechState, Start, Started, State,
    Switch, Switched, Text, encode_audio_frame, frame_samples, parse_client_audio, parse_client_text,
)

log = logging.getLogger("npc_voice.server")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("npc-voice")
    except PackageNotFoundError:  # pragma: no cover - run from a plain checkout
        return "dev"


_pkg_version = _version()

DEFAULT_PORT = 8765
TOKEN_ENV = "NPC_VOICE_TOKEN"
MIN_REMOTE_TOKEN_CHARS = 16
SERVE_MAX_INPUT_SECONDS = 0.5


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT  # 0: any free port (see NPCVoiceServer.port)
    token: str | None = None  # required whenever host is not a loopback address
    idle_timeout: float = 30.0  # seconds without any message from the client
    max_connections: int | None = None  # default: 4 per slot + 4
    out_audio_frames: int = 12  # per-connection queue of NPC audio (about 1 s): the oldest is dropped beyond
    send_buffer_bytes: int | None = 32 << 10  # SO_SNDBUF of each connection: bounds what the kernel holds for a
    write_limit: int = 16 << 10  # slow reader (else it autotunes to MBs: seconds of lag before any drop)
    out_events: int = 512  # per-connection queue of JSON messages
    dropped_report_s: float = 1.0  # at most one `dropped` message per interval
    build_workers: int = 4  # threads that read and decode characters' files (prompts are built by the engine thread)
    ping_interval: float | None = 20.0  # websocket keepalive: a vanished peer is found within ping_interval + ping_timeout
    ping_timeout: float | None = 20.0
    close_grace_s: float = 2.0  # a closing client that does not read is cut off after this
    limits: Limits = field(default_factory=Limits)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_bind(host: str, token: str | None) -> None:
    """Refuses a public bind without a token (ValueError says what to do)."""
    if is_loopback(host):
        return
    if not token:
        raise ValueError(f"refusing to listen on {host} without a token: anyone who reaches this port could use "
                         f"the GPU; pass --token (or set {TOKEN_ENV}), or bind 127.0.0.1")
    if len(token) < MIN_REMOTE_TOKEN_CHARS:
        raise ValueError(f"the token has {len(token)} characters; use at least {MIN_REMOTE_TOKEN_CHARS} for a "
                         "non-loopback bind (e.g. `python -c 'import secrets; print(secrets.token_urlsafe(24))'`)")


# --- characters: npc_voice.characters.resolve, its errors as the protocol's -----------------------


def resolve_character(store: Any, spec: str | InlineCharacter, limits: Limits) -> tuple[Persona, str]:
    """A start/switch `character` -> (the engine's Persona, a label for `started`/`switched`):
    `resolve_persona`, its `ResolveError` sent as the `ProtocolError` of the same code and message."""
    try:
        return resolve_persona(store, spec, limits)
    except ResolveError as exc:
        raise ProtocolError(exc.code, exc.message) from None


# --- audio conversion -----------------------------------------------------------------------------


class InputConverter:
    """Client PCM16 at `rate` -> float32 at 24 kHz, as a stream (no clicks between chunks)."""

    def __init__(self, rate: int):
        self.rate = rate
        self._stream = None
        if rate != MODEL_RATE:
            import soxr

            self._stream = soxr.ResampleStream(rate, MODEL_RATE, 1, dtype="float32", quality="HQ")

    def __call__(self, pcm16: np.ndarray) -> np.ndarray:
        x = pcm16_to_float(pcm16)
        return x if self._stream is None else self._stream.resample_chunk(x)


@functools.lru_cache(maxsize=None)
def _resampler_lag(from_rate: int, to_rate: int, chunk: int) -> int:
    """The most a soxr stream's output falls behind chunk-by-chunk (it works in blocks): the zeros
    an `OutputFramer` starts with so that every frame it emits is whole."""
    import soxr

    stream = soxr.ResampleStream(from_rate, to_rate, 1, dtype="float32", quality="HQ")
    target = chunk * to_rate // from_rate
    got = worst = 0
    for k in range(1, 101):
        got += stream.resample_chunk(np.zeros(chunk, dtype=np.float32)).shape[0]
        worst = max(worst, k * target - got)
    return worst


class OutputFramer:
    """NPC frames (1920 float32 at 24 kHz) -> exactly one frame of PCM16 at the client's rate each.

    At 24 kHz this is only the 16-bit conversion. At 16/48 kHz, libsoxr's stream emits samples in
    blocks, so the framer starts with as many zeros as the stream can fall behind (about 35 ms) and
    from then on every call returns one whole frame; should the stream ever fall further behind,
    the frame is padded with zeros (counted in `underruns`)."""

    def __init__(self, rate: int):
        self.rate, self.size = rate, frame_samples(rate)
        self.underruns = 0
        self._stream = None
        if rate != MODEL_RATE:
            import soxr

            self._stream = soxr.ResampleStream(MODEL_RATE, rate, 1, dtype="float32", quality="HQ")
            self._fifo = np.zeros(_resampler_lag(MODEL_RATE, rate, frame_samples(MODEL_RATE)), dtype=np.float32)

    def __call__(self, pcm: np.ndarray) -> np.ndarray:
        if self._stream is None:
            return float_to_pcm16(pcm)
        fifo = np.concatenate([self._fifo, self._stream.resample_chunk(np.asarray(pcm, dtype=np.float32))])
        if fifo.shape[0] < self.size:
            self.underruns += 1
            fifo = np.concatenate([np.zeros(self.size - fifo.shape[0], dtype=np.float32), fifo])
        out, self._fifo = fifo[: self.size], fifo[self.size:]
        return float_to_pcm16(out)


# --- the engine thread -> event loop hand-off -----------------------------------------------------


class Outbox:
    """What a connection will send, in order: JSON messages and NPC audio frames.

    Filled from any thread (the engine thread's listener, the event loop), emptied by the
    connection's sender task. Bounded: beyond `max_audio` audio frames the oldest frame is dropped
    (counted on its session link), beyond `max_json` JSON messages the oldest message is. Wakes the
    event loop with `call_soon_threadsafe`, with at most one wake-up pending."""

    def __init__(self, loop: asyncio.AbstractEventLoop, max_audio: int, max_json: int):
        self.loop, self.max_audio, self.max_json = loop, max_audio, max_json
        self._items: collections.deque[tuple[Any, ...]] = collections.deque()
        self._n_audio = self._n_json = 0
        self._lock = threading.Lock()
        self._ready = asyncio.Event()
        self._wake_pending = False
        self.dropped_audio = 0
        self.dropped_json = 0

    def put_json(self, text: str) -> None:
        with self._lock:
            self._items.append(("json", text))
            self._n_json += 1
            while self._n_json > self.max_json:
                self._drop_oldest("json")
                self.dropped_json += 1
            wake = self._arm()
        if wake:
            self._wake()

    def put_audio(self, link: SessionLink, frame: int, pcm: np.ndarray) -> None:
        with self._lock:
            self._items.append(("audio", link, frame, pcm))
            self._n_audio += 1
            while self._n_audio > self.max_audio:
                dropped = self._drop_oldest("audio")
                dropped[1].dropped_output += 1
                self.dropped_audio += 1
            wake = self._arm()
        if wake:
            self._wake()

    def _drop_oldest(self, kind: str) -> tuple[Any, ...]:
        for i, item in enumerate(self._items):
            if item[0] == kind:
                del self._items[i]
                if kind == "audio":
                    self._n_audio -= 1
                else:
                    self._n_json -= 1
                return item
        raise AssertionError("count and queue disagree")

    def _arm(self) -> bool:
        if self._wake_pending:
            return False
        self._wake_pending = True
        return True

    def _wake(self) -> None:
        try:
            self.loop.call_soon_threadsafe(self._on_wake)
        except RuntimeError:  # the loop is closed: nobody is left to send to
            pass

    def _on_wake(self) -> None:
        with self._lock:
            self._wake_pending = False
        self._ready.set()

    def pop(self) -> tuple[Any, ...] | None:
        """The next item, or None (and the ready flag cleared) when empty. Event loop only."""
        with self._lock:
            if not self._items:
                self._ready.clear()
                return None
            item = self._items.popleft()
            if item[0] == "audio":
                self._n_audio -= 1
            else:
                self._n_json -= 1
            return item

    async def wait(self) -> None:
        await self._ready.wait()

    def kick(self) -> None:
        """Wakes the sender from the event loop (e.g. to close)."""
        self._ready.set()

    def __len__(self) -> int:
        return len(self._items)

    @property
    def audio_frames(self) -> int:
        return self._n_audio


class SessionLink:
    """One session as its connection sees it; `on_frame` is the engine listener (engine thread:
    it only computes the speaking state and appends to the outbox, never blocks)."""

    def __init__(self, outbox: Outbox, started: Started, rate: int):
        self.outbox, self.started, self.rate = outbox, started, rate
        self.session: Session | None = None
        self.label = started.character
        self.lock = threading.Lock()
        self.active = True
        self.frames = 0  # NPC frames produced: the frame index of the next one
        self.dropped_output = 0  # frames the client read too slowly for (counted by the outbox)
        self.reported_output = self.reported_input = 0
        self.speech = SpeechState()
        self.framer = OutputFramer(rate)
        self.input = InputConverter(rate)
        self.pending_switches: list[Switched] = []
        self.first_frame = asyncio.get_running_loop().create_future()

    def on_frame(self, event: FrameEvent) -> None:
        try:
            with self.lock:
                if not self.active:
                    return
                index = self.frames
                self.frames += 1
                out = self.outbox
                if index == 0:
                    out.put_json(self.started.model_copy(update={"session": event.session_id}).encode())
                    self.outbox.loop.call_soon_threadsafe(self._first_frame_done)
                elif event.frame == 0 and self.pending_switches:  # the engine installed a new character
                    for msg in self.pending_switches:
                        out.put_json(msg.model_copy(update={"frame": index}).encode())
                    self.label = self.pending_switches[-1].character
                    self.pending_switches.clear()
                time_s = round(index * FRAME_SECONDS, 2)
                if event.text:
                    out.put_json(Text(frame=index, time=time_s, text=event.text).encode())
                change = self.speech.update(index, event.text, event.pcm)
                if change is not None:
                    state, at = change
                    out.put_json(State(state=state, frame=at, time=round(at * FRAME_SECONDS, 2)).encode())
                out.put_audio(self, index, event.pcm)
        except Exception:  # never let a client's bookkeeping stop the engine
            log.exception("frame listener failed")

    def _first_frame_done(self) -> None:
        if not self.first_frame.done():
            self.first_frame.set_result(None)

    def deactivate(self) -> None:
        """No frame is queued after this returns (the engine may still step the slot once)."""
        with self.lock:
            self.active = False
        if not self.first_frame.done():
            self.first_frame.cancel()

    @property
    def dropped_input(self) -> int:
        return self.session.input.dropped_frames if self.session is not None else 0


# --- sessions and connections ---------------------------------------------------------------------


class SessionManager:
    """The server's connections and counters. Slots belong to the engine (`Engine.reserve`): one is
    taken per session being opened or live, so a full server answers `server_busy` before building
    anything."""

    def __init__(self, engine: Engine, max_connections: int):
        self.engine, self.max_connections = engine, max_connections
        self.slots = engine.slots
        self.connections: set[Connection] = set()
        self.started = self.refused_busy = 0
        self.dropped_output = self.dropped_input = 0

    def reserve(self) -> int | None:
        """A slot for a session about to start, or None (counted) when all are taken."""
        try:
            return self.engine.reserve()
        except EngineFull:
            self.refused_busy += 1
            return None

    def release(self, slot: int) -> None:
        self.engine.release(slot)

    @property
    def free(self) -> int:
        return self.engine.free_slots

    @property
    def reserved(self) -> int:
        return self.slots - self.free


class Connection:
    """One websocket client: reads and validates its messages, owns at most one session at a time;
    a sender task is the only writer to the socket."""

    def __init__(self, server: NPCVoiceServer, ws: Any):
        self.server, self.ws = server, ws
        self.config = server.config
        self.limits = server.config.limits
        self.outbox = Outbox(asyncio.get_running_loop(), self.config.out_audio_frames, self.config.out_events)
        self.link: SessionLink | None = None
        self.last_rx = time.monotonic()
        self.handling = False  # a message is being handled (a start may wait for a build): the idle timer waits
        self.closed = False
        self._close_with: tuple[int, str] | None = None
        self._last_report = 0.0

    # --- life cycle -----------------------------------------------------------------------------

    async def run(self) -> None:
        from websockets.exceptions import ConnectionClosed

        sender = asyncio.create_task(self._send_loop())
        watchdog = asyncio.create_task(self._watchdog())
        self.outbox.put_json(Hello(server=f"npc-voice {_pkg_version}", max_audio_bytes=self.limits.max_audio_bytes,
                                   max_text_bytes=self.limits.max_text_bytes,
                                   idle_timeout_s=self.config.idle_timeout).encode())
        if self.server.closing:  # accepted just before the server began to stop
            self.shut_down()
        try:
            async for message in self.ws:
                self.last_rx = time.monotonic()
                self.handling = True
                try:
                    if isinstance(message, str):
                        await self._on_text(message)
                    else:
                        self._on_audio(message)
                except ProtocolError as exc:
                    self.send(exc.to_message())
                except Exception as exc:  # our fault, not the client's: said and logged, never a 1011 close
                    log.exception("a client message failed")
                    self.send(ErrorMsg(code=ErrorCode.INTERNAL_ERROR.value,
                                       message=f"the server failed on this message: {exc!r}"[:500]))
                finally:  # nothing is read while a message is handled: that time is not the client's idling
                    self.handling = False
                    self.last_rx = time.monotonic()
        except ConnectionClosed:
            pass
        finally:
            self.closed = True
            self.end_session(None)  # a vanished client frees its slot at the engine's next tick
            watchdog.cancel()
            sender.cancel()
            await asyncio.gather(watchdog, sender, return_exceptions=True)

    def send(self, msg: Any) -> None:
        self.outbox.put_json(msg.encode())

    def shut_down(self) -> None:
        """The server is stopping: `shutting_down` (fatal), `ended` for a live session, close 1001."""
        self.send(ErrorMsg(code=ErrorCode.SHUTTING_DOWN.value, message="the server is shutting down", fatal=True))
        self.end_session(ErrorCode.SHUTTING_DOWN.value)
        self.close_after_flush(1001, ErrorCode.SHUTTING_DOWN.value)

    def close_after_flush(self, code: int, reason: str) -> None:
        """Sends what is queued, then closes; a client that does not read is cut off after the grace time."""
        if self._close_with is None:
            self._close_with = (code, reason)
            self.outbox.kick()
            asyncio.get_running_loop().call_later(self.config.close_grace_s, self._abort)

    def _abort(self) -> None:
        if not self.closed:
            transport = getattr(self.ws, "transport", None)
            if transport is not None:
                transport.abort()

    async def _send_loop(self) -> None:
        ws = self.ws
        while True:
            item = self.outbox.pop()
            if item is None:
                if self._close_with is not None:
                    await ws.close(*self._close_with)
                    return
                await self.outbox.wait()
                continue
            if item[0] == "json":
                await ws.send(item[1])
            else:
                _, link, frame, pcm = item
                await ws.send(encode_audio_frame(frame, link.framer(pcm)))
                self._report_drops(link)

    def _report_drops(self, link: SessionLink) -> None:
        now = time.monotonic()
        if now - self._last_report < self.config.dropped_report_s:
            return
        out, inp = link.dropped_output, link.dropped_input
        if out != link.reported_output or inp != link.reported_input:
            self._last_report = now
            self.send(Dropped(output_frames=out - link.reported_output, input_frames=inp - link.reported_input,
                              total_output_frames=out, total_input_frames=inp))
            self.server.manager.dropped_output += out - link.reported_output
            self.server.manager.dropped_input += inp - link.reported_input
            link.reported_output, link.reported_input = out, inp

    async def _watchdog(self) -> None:
        timeout = self.config.idle_timeout
        while True:
            idle = time.monotonic() - self.last_rx
            if idle >= timeout and not self.handling:
                self.send(ErrorMsg(code=ErrorCode.IDLE_TIMEOUT.value, fatal=True,
                                   message=f"nothing received for {timeout:g} s: closing (send audio, silence "
                                   "included, while a session is live)"))
                self.end_session("idle_timeout")
                self.close_after_flush(1008, ErrorCode.IDLE_TIMEOUT.value)
                return
            await asyncio.sleep(min(1.0, max(0.05, timeout - idle)))

    # --- messages -------------------------------------------------------------------------------

    def _on_audio(self, data: bytes) -> None:
        if len(data) <= self.limits.max_audio_bytes and self.link is None:
            raise ProtocolError(ErrorCode.NO_SESSION, "audio before start: send a start message first")
        pcm16 = parse_client_audio(data, self.limits)  # message_too_large, bad_audio
        link = self.link
        samples = link.input(pcm16)
        if samples.shape[0]:
            link.session.push_audio(samples)

    async def _on_text(self, data: str) -> None:
        msg: ClientMessage = parse_client_text(data, self.limits)
        try:
            if isinstance(msg, Start):
                await self._start(msg)
                return
            if self.link is None:
                raise ProtocolError(ErrorCode.NO_SESSION, f"{msg.type} without a session: send start first")
            if isinstance(msg, Switch):
                await self._switch(msg)
            elif isinstance(msg, Say):
                self.server.engine.say(self.link.session, msg.text)
            elif isinstance(msg, End):
                self.end_session("client", ref=msg.ref)
        except ProtocolError as exc:
            if exc.ref is None:
                exc.ref = msg.ref  # every reply to a request carries its ref
            raise

    async def _start(self, msg: Start) -> None:
        server = self.server
        if self.link is not None:
            raise ProtocolError(ErrorCode.SESSION_ACTIVE, "this connection already has a session: end it first "
                                "(one session per connection; open another connection for another NPC)", ref=msg.ref)
        if server.closing:
            raise ProtocolError(ErrorCode.SHUTTING_DOWN, "the server is shutting down", ref=msg.ref)
        if server.loop_error is not None:
            raise ProtocolError(ErrorCode.INTERNAL_ERROR, f"the engine stopped: {server.loop_error}", ref=msg.ref)
        slot = server.manager.reserve()
        if slot is None:
            raise ProtocolError(ErrorCode.SERVER_BUSY, f"all {server.manager.slots} conversation slots are in use: "
                                "retry later", ref=msg.ref)
        try:
            persona, label = await server.run_blocking(resolve_character, server.store, msg.character, self.limits)
            started = Started(session="", character=label, sample_rate=msg.sample_rate,
                              frame_samples=frame_samples(msg.sample_rate), ref=msg.ref)
            link = SessionLink(self.outbox, started, msg.sample_rate)
            session = await server.open_session(persona, msg.seed, link.on_frame, msg.ref, slot)
        except BaseException:
            server.manager.release(slot)  # a no-op once a session holds it (closing it frees it)
            raise
        link.session = session
        server.manager.started += 1
        self.link = link
        if self.closed:  # the client left while its character was being prepared
            self.end_session(None)
        elif self._close_with is not None:  # the server is closing this connection (shutting down)
            self.end_session(self._close_with[1])

    async def _switch(self, msg: Switch) -> None:
        link = self.link
        try:  # `started` goes out first: afterwards a frame 0 means the switch was installed
            await asyncio.shield(link.first_frame)
        except asyncio.CancelledError:
            if link.first_frame.cancelled():  # the session ended meanwhile
                raise ProtocolError(ErrorCode.NO_SESSION, "switch: the session has ended", ref=msg.ref) from None
            raise
        persona, label = await self.server.run_blocking(resolve_character, self.server.store, msg.character,
                                                        self.limits)
        if self.link is not link:
            return  # ended meanwhile
        ack = Switched(character=label, frame=-1, ref=msg.ref)
        with link.lock:
            link.pending_switches.append(ack)
        done: concurrent.futures.Future | None = None
        try:
            # Returns once the voice is read; the character is installed (and `switched` sent with
            # its first frame) when the engine thread has built it, while the old one goes on.
            done = await self.server.run_blocking(self.server.engine.switch, link.session, persona)
            await asyncio.wrap_future(done)
        except BaseException as exc:
            with link.lock:
                if ack in link.pending_switches:
                    link.pending_switches.remove(ack)
            if done is not None and done.cancelled():
                return  # superseded by a later switch, or the session ended
            if isinstance(exc, Exception):
                raise character_error(exc, msg.ref, "switch: ") from None
            raise

    def end_session(self, reason: str | None, ref: Any = None) -> None:
        """Ends the live session (if any); `reason` None: the client is gone, nothing is sent."""
        link, self.link = self.link, None
        if link is None:
            if reason == "client":
                raise ProtocolError(ErrorCode.NO_SESSION, "end without a session", ref=ref)
            return
        link.deactivate()
        self.server.engine.close(link.session)  # frees its slot
        self.server.manager.dropped_output += link.dropped_output - link.reported_output
        self.server.manager.dropped_input += link.dropped_input - link.reported_input
        if reason is not None:
            self.send(Ended(session=link.session.id, reason=reason, frames=link.frames,
                            dropped_output_frames=link.dropped_output, dropped_input_frames=link.dropped_input,
                            ref=ref))


# --- the server -----------------------------------------------------------------------------------


HEALTH_TICKS = 125  # /health's tick percentiles cover the last 10 s


def _tick_stats(runner: EngineLoop | None) -> dict[str, float | int]:
    recent = list(runner.tick_ms)[-HEALTH_TICKS:] if runner is not None else []
    if not recent:
        return {"p50": 0.0, "p99": 0.0, "ticks": 0}
    return {"p50": round(percentile(recent, 0.5), 2), "p99": round(percentile(recent, 0.99), 2), "ticks": len(recent)}


def character_error(exc: Exception, ref: Any, what: str = "") -> ProtocolError:
    """`invalid_character` for a character `Engine.open`/`switch` could not use: its voice could not
    be read (ValueError, OSError: AudioError included), or its prompt failed to build."""
    reason = "voice cannot be used" if isinstance(exc, (ValueError, OSError)) else "prompt could not be built"
    return ProtocolError(ErrorCode.INVALID_CHARACTER, f"{what}the character's {reason}: {exc}", ref=ref)


def _install_stats(engine: Engine) -> dict[str, float]:
    recent = list(engine.install_ms)
    return {"p50": round(percentile(recent, 0.5), 2), "max": round(max(recent, default=0.0), 2)}


def _json_response(connection: Any, status: int, body: dict[str, Any]) -> Any:
    response = connection.respond(status, json.dumps(body) + "\n")
    del response.headers["Content-Type"]
    response.headers["Content-Type"] = "application/json"
    response.headers["Cache-Control"] = "no-store"
    return response


class NPCVoiceServer:
    """The websocket server around an `Engine`. Use `async with NPCVoiceServer(engine, config, store)`
    (or `await start()` / `await stop()`); `port` is the bound port."""

    def __init__(self, engine: Engine, config: ServerConfig | None = None, store: Any = None):
        self.engine = engine
        self.config = config or ServerConfig()
        check_bind(self.config.host, self.config.token)
        self.store = store
        max_conn = self.config.max_connections or 4 * engine.slots + 4
        self.manager = SessionManager(engine, max_conn)
        self.loop_runner: EngineLoop | None = None
        self.closing = False
        self.started_at = time.monotonic()
        self._server: Any = None
        self._monitor: asyncio.Task[None] | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(self.config.build_workers, thread_name_prefix="npc-voice-build")
        self.port: int | None = None

    @property
    def loop_error(self) -> BaseException | None:
        return self.loop_runner.error if self.loop_runner is not None else None

    # --- life cycle -----------------------------------------------------------------------------

    async def start(self) -> NPCVoiceServer:
        from websockets.asyncio.server import serve

        self.loop_runner = EngineLoop(self.engine).start()
        cfg = self.config
        self._server = await serve(
            self._handle, cfg.host, cfg.port, process_request=self._process_request,
            max_size=cfg.limits.max_message_bytes, max_queue=32, compression=None, write_limit=cfg.write_limit,
            ping_interval=cfg.ping_interval, ping_timeout=cfg.ping_timeout, close_timeout=cfg.close_grace_s,
            server_header=f"npc-voice/{_pkg_version}",
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self.started_at = time.monotonic()
        self._monitor = asyncio.create_task(self._watch_engine())
        return self

    async def stop(self) -> None:
        self.closing = True
        if self._monitor is not None:
            self._monitor.cancel()
        for conn in list(self.manager.connections):
            conn.shut_down()
        # The grace period: each connection sends what it has queued and closes (1001); meanwhile the
        # listener stays open and answers handshakes with HTTP 503 `shutting_down`, /health `stopping`.
        deadline = time.monotonic() + self.config.close_grace_s + 1
        while self.manager.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._server is not None:
            self._server.close()  # a connection still open now is closed with 1001
            try:
                await asyncio.wait_for(self._server.wait_closed(), self.config.close_grace_s + 1)
            except asyncio.TimeoutError:
                pass
        if self.loop_runner is not None:
            await asyncio.to_thread(self.loop_runner.stop)
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def __aenter__(self) -> NPCVoiceServer:
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()

    async def serve_forever(self) -> None:
        await self._server.serve_forever()

    # --- helpers for connections ----------------------------------------------------------------

    async def run_blocking(self, fn: Any, *args: Any) -> Any:
        """Runs file reading and decoding off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args))

    async def open_session(self, persona: Persona, seed: int | None, listener: Any, ref: Any,
                           slot: int | None = None) -> Session:
        """Opens the engine session (in `slot`, reserved by `SessionManager.reserve`) and waits until
        its character is installed (a new character is built by the engine thread meanwhile)."""
        try:
            session = await self.run_blocking(functools.partial(self.engine.open, persona, seed=seed, listener=listener,
                                                                slot=slot))
        except EngineFull:
            raise ProtocolError(ErrorCode.SERVER_BUSY, "all conversation slots are in use: retry later", ref=ref) from None
        except (ValueError, OSError) as exc:
            raise character_error(exc, ref) from None
        try:
            await asyncio.wrap_future(session.started)
        except asyncio.CancelledError:
            self.engine.close(session)  # the client left while its character was being built
            raise
        except Exception as exc:  # the build failed: this character only, nothing else is touched
            raise character_error(exc, ref) from None
        return session

    # --- websockets hooks -----------------------------------------------------------------------

    def _authorized(self, request: Any, query: dict[str, list[str]]) -> bool:
        token = self.config.token
        if not token:
            return True
        given = None
        header = request.headers.get("Authorization", "")
        if header.lower().startswith("bearer "):
            given = header[7:].strip()
        elif query.get("token"):
            given = query["token"][0]
        return given is not None and hmac.compare_digest(given.encode(), token.encode())

    def _process_request(self, connection: Any, request: Any) -> Any:
        url = urlsplit(request.path)
        if url.path == HEALTH_PATH:
            health = self.health()
            return _json_response(connection, 200 if health["status"] == "ok" else 503, health)
        if url.path != WS_PATH:
            return _json_response(connection, http.HTTPStatus.NOT_FOUND, {
                "type": "error", "code": ErrorCode.NOT_FOUND.value,
                "message": f"no such path: the websocket endpoint is {WS_PATH}, the health check {HEALTH_PATH}"})
        if not self._authorized(request, parse_qs(url.query)):
            return _json_response(connection, http.HTTPStatus.UNAUTHORIZED, {
                "type": "error", "code": ErrorCode.UNAUTHORIZED.value,
                "message": "missing or wrong token: send the header 'Authorization: Bearer TOKEN' (or ?token=TOKEN)"})
        if self.closing or len(self.manager.connections) >= self.manager.max_connections:
            code = ErrorCode.SHUTTING_DOWN if self.closing else ErrorCode.SERVER_BUSY
            return _json_response(connection, http.HTTPStatus.SERVICE_UNAVAILABLE, {
                "type": "error", "code": code.value, "message": "too many connections: retry later"
                if code is ErrorCode.SERVER_BUSY else "the server is shutting down"})
        return None

    async def _handle(self, ws: Any) -> None:
        sock = ws.transport.get_extra_info("socket") if ws.transport is not None else None
        if sock is not None and self.config.send_buffer_bytes:
            import socket

            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.config.send_buffer_bytes)
        conn = Connection(self, ws)
        self.manager.connections.add(conn)
        try:
            await conn.run()  # a fault here is logged by websockets and closes with 1011
        finally:
            self.manager.connections.discard(conn)

    async def _watch_engine(self) -> None:
        """Should the engine's thread die, every live session is told (`internal_error`, then
        `ended` with reason `error`) and new ones are refused; /health says `error`."""
        while self.loop_error is None:
            await asyncio.sleep(0.25)
        log.error("the engine loop stopped: %r", self.loop_error)
        for conn in list(self.manager.connections):
            if conn.link is not None:
                conn.send(ErrorMsg(code=ErrorCode.INTERNAL_ERROR.value, message=f"the engine stopped: "
                                   f"{self.loop_error!r}"))
                conn.end_session("error")

    def health(self) -> dict[str, Any]:
        runner, model = self.loop_runner, self.engine.model
        error = self.loop_error
        return {
            "status": "error" if error is not None else ("stopping" if self.closing else "ok"),
            "error": None if error is None else repr(error),
            "protocol": PROTOCOL_VERSION,
            "server": f"npc-voice {_pkg_version}",
            "model": model.config.name,
            "weights": "random" if model.random_weights else model.source,
            "device": str(model.device),
            "dtype": str(model.dtype).removeprefix("torch."),
            "slots": {"total": self.manager.slots, "used": self.manager.reserved, "free": self.manager.free},
            "engine_sessions": len(self.engine.sessions),
            "connections": len(self.manager.connections),
            "tick_ms": _tick_stats(runner),
            "builds": {"pending": self.engine.builds_pending, "install_ms": _install_stats(self.engine)},
            "prefix_cache": self.engine.cache.stats(),
            "ticks": self.engine.ticks,
            "overruns": runner.overruns if runner else 0,
            "uptime_s": round(time.monotonic() - self.started_at, 1),
            "totals": {"sessions": self.manager.started, "refused_busy": self.manager.refused_busy,
                       "dropped_output_frames": self.manager.dropped_output,
                       "dropped_input_frames": self.manager.dropped_input},
        }


class BackgroundServer:
    """An `NPCVoiceServer` on its own event loop thread, for programs that are not asyncio (a game's
    editor tooling, tests): `with BackgroundServer(engine, config, store) as bg: bg.url ...`."""

    def __init__(self, engine: Engine, config: ServerConfig | None = None, store: Any = None):
        self.server = NPCVoiceServer(engine, config, store)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="npc-voice-server", daemon=True)

    @property
    def url(self) -> str:
        host = self.server.config.host
        host = f"[{host}]" if ":" in host else host
        return f"ws://{host}:{self.server.port}{WS_PATH}"

    def call(self, fn: Any, *args: Any) -> Any:
        """Runs `fn(*args)` on the server's loop (a coroutine function is awaited); returns its result."""
        async def run() -> Any:
            result = fn(*args)
            return await result if asyncio.iscoroutine(result) else result

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result()

    def start(self) -> BackgroundServer:
        self._thread.start()
        self.call(self.server.start)
        return self

    def stop(self) -> None:
        try:
            self.call(self.server.stop)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join()
            self.loop.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


# --- command line ---------------------------------------------------------------------------------


def add_serve_command(sub: Any) -> None:
    """Registers `npc-voice serve` (called from npc_voice.cli)."""
    from .cli import _add_model_args

    p = sub.add_parser("serve", help="websocket server for game engines (docs/protocol.md)")
    _add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; any other needs --token)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}; 0 picks a free port")
    p.add_argument("--slots", type=int, default=8, help="concurrent conversations (default 8)")
    p.add_argument("--token", default=os.environ.get(TOKEN_ENV),
                   help=f"shared secret clients must send (default: ${TOKEN_ENV}); required off loopback")
    p.add_argument("--characters", help="characters folder (default: $NPC_VOICE_CHARACTERS, ./characters, the shipped cast)")
    p.add_argument("--voices", help="preset voices folder (NAME.pt; default: $NPC_VOICE_VOICES or voices/ beside "
                   "the characters folder)")
    p.add_argument("--idle-timeout", type=float, default=30.0, help="seconds without client messages before closing")
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    p.add_argument("--prefix-cache", help="folder caching built character prompts across restarts")
    p.add_argument("--prefix-cache-mb", type=int, default=DEFAULT_CACHE_MB,
                   help=f"memory for built character prompts, in MB (default {DEFAULT_CACHE_MB}; about 110 MB per "
                   "character at 7B, 0.3 MB on the tiny model); least recently used ones go first")
    p.add_argument("--prefix-cache-on", choices=["host", "device"], default="device",
                   help="where cached prompts live on a GPU machine: GPU memory (default; installed in ~6 ms at 7B) "
                   "or host memory (leaves GPU memory to conversations; copied back at each install)")
    p.add_argument("--log-level", default="INFO")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from .cli import _load
    from .engine import PrefixCache

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        check_bind(args.host, args.token)
        store = open_store(args.characters, args.voices)
    except ValueError as exc:
        print(f"npc-voice serve: {exc}", file=sys.stderr)
        return 2
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if not args.weights:
        print("npc-voice serve: no --weights: serving the tiny built-in model with RANDOM weights (its NPCs babble)",
              file=sys.stderr)
    model = _load(args)
    if store is not None:
        store.tokenizer = model.tokenizer  # roles counted as this model tokenizes them
        store.context_frames = model.config.lm.context  # prompts held to this model's context (--context)
    cache = PrefixCache(model, max_bytes=args.prefix_cache_mb << 20, directory=args.prefix_cache,
                        on=args.prefix_cache_on)
    # Player audio more than 0.5 s ahead of the engine is dropped (oldest first): after a hiccup the
    # conversation catches up instead of keeping the backlog as lag for good.
    engine = Engine(model, slots=args.slots, cache=cache, max_input_seconds=SERVE_MAX_INPUT_SECONDS)
    config = ServerConfig(host=args.host, port=args.port, token=args.token, idle_timeout=args.idle_timeout)

    async def main() -> None:
        async with NPCVoiceServer(engine, config, store) as server:
            where = f"ws://{args.host}:{server.port}{WS_PATH}"
            print(f"npc-voice serve: {where} ({engine.slots} slots, model {model.config.name} on {model.device}, "
                  f"characters: {getattr(store, 'root', 'none')}, token: {'yes' if args.token else 'no'}); "
                  f"health: http://{args.host}:{server.port}{HEALTH_PATH}", file=sys.stderr, flush=True)
            stop = asyncio.Event()
            for sig in (signal.SIGTERM, signal.SIGINT):  # both: a graceful stop (NPCVoiceServer.stop)
                try:
                    asyncio.get_running_loop().add_signal_handler(sig, stop.set)
                except (NotImplementedError, AttributeError):  # pragma: no cover - Windows: Ctrl-C stops at once
                    pass
            await stop.wait()
            print("npc-voice serve: shutting down", file=sys.stderr, flush=True)

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
    return 0
