"""The protocol's state machine on the server side, without I/O (docs/protocol.md), as the
`websockets` library's `protocol.py` does it: `ServerSession` is one connection as the server sees it.

Data goes in: the client's frames (`receive_text`, `receive_bytes`) and the engine's facts (an NPC
frame, an install that succeeded or failed, a drop count, a timeout). Out come the data to write
(`data_to_send()`: JSON texts, and NPC audio frames still at the model's rate, converted and encoded
only when written so that a frame dropped on the way costs nothing) and the requests the I/O layer
carries out with the engine (`events_received()`). No asyncio, no sockets, no threads.

Two threads call a server's session (the engine's listener with NPC frames, the event loop with
the client's messages): the caller passes a re-entrant lock, which every method holds while it
changes state (a client message is parsed before, outside it: a big one never delays a frame).
"""

from __future__ import annotations

import contextlib
import enum
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np

from ..model.config import FRAME_SECONDS
from .messages import (
    ClientMessage, Dropped, End, Ended, ErrorCode, ErrorMsg, Hello, Limits, ProtocolError, Say, Start, Started, State,
    Switch, Switched, Text, Visemes, encode_audio_frame, frame_samples,
)
from ..visemes import STEP_MS, VisemeAnalyzer
from .parse import parse_client_audio, parse_client_text
from .rates import InputConverter, OutputFramer
from .speech import SpeechState


class Phase(str, enum.Enum):
    """Where a connection's session stands."""

    IDLE = "idle"  # no session: waiting for `start` (also after `ended`)
    STARTING = "starting"  # a `start` is being carried out (the character resolved, built, installed)
    LIVE = "live"  # the engine runs the session (`started` goes out with its first frame)
    CLOSING = "closing"  # a fatal error was sent: the connection closes once its data is written


# --- what the I/O layer is asked to do (events_received) --------------------------------------


@dataclass(frozen=True)
class StartRequest:
    """Reserve a slot, resolve `message.character`, then `start_accepted` / `start_opened` (or `refuse`)."""

    message: Start


@dataclass(frozen=True)
class SwitchRequest:
    """Resolve `message.character`, then `switch_accepted`, engine switch, `switch_settled` (or `refuse`)."""

    message: Switch


@dataclass(frozen=True)
class SayRequest:
    message: Say


@dataclass(frozen=True)
class AudioReceived:
    """Player audio for the engine: float32 at the model's rate (may be empty while a resampler fills)."""

    samples: np.ndarray


@dataclass(frozen=True)
class SessionEnded:
    """Close the engine session of `live` (its slot is free at the engine's next tick)."""

    live: LiveSession
    reason: str | None  # None: the client is gone, nothing was sent


ServerEvent = Union[StartRequest, SwitchRequest, SayRequest, AudioReceived, SessionEnded]


@dataclass(frozen=True, eq=False)
class OutgoingAudio:
    """An NPC audio frame to write: the JSON text `before` if any (its `visemes` message), then
    `live.encode(frame, pcm)`, when it is written; a frame dropped on the way (a slow reader) takes
    its `before` with it."""

    live: LiveSession
    frame: int
    pcm: np.ndarray  # float32 at the model's rate
    before: str | None = None


@dataclass(eq=False)
class LiveSession:
    """One session of a connection: its frame counter, speaking state, rate converters, drop counts.
    `dropped_output` is counted by whoever drops queued audio (the server's outbox)."""

    character: str  # the label `started` / `switched` name
    sample_rate: int
    ref: Any
    session_id: str = ""  # the engine's id, known once opened
    active: bool = True
    frames: int = 0  # NPC frames produced: the index of the next one
    dropped_output: int = 0
    dropped_input: int = 0
    reported_output: int = 0
    reported_input: int = 0
    pending_switches: list[Switched] = field(default_factory=list)
    speech: SpeechState = field(default_factory=SpeechState)
    visemes: VisemeAnalyzer | None = None  # the mouth track, when `start` asked for it

    def __post_init__(self) -> None:
        self.input = InputConverter(self.sample_rate)
        self.framer = OutputFramer(self.sample_rate)

    @property
    def started_sent(self) -> bool:
        return self.frames > 0

    def encode(self, frame: int, pcm: np.ndarray) -> bytes:
        """A binary audio message: the frame index, then one frame at the client's rate."""
        return encode_audio_frame(frame, self.framer(pcm))


Outgoing = Union[str, OutgoingAudio]


class ServerSession:
    """One websocket connection's protocol, on the server side. See the module's docstring."""

    def __init__(self, limits: Limits, *, server: str, idle_timeout: float, dropped_report_s: float = 1.0,
                 lock: Any = None, visemes: bool = True):
        self.limits, self.dropped_report_s = limits, dropped_report_s
        self.visemes = visemes  # False: the server was started with --no-visemes
        self._lock = lock if lock is not None else contextlib.nullcontext()
        self.phase = Phase.IDLE
        self.live: LiveSession | None = None
        self.close_code: tuple[int, str] | None = None  # set: close with it once the data is written
        self._out: list[Outgoing] = []
        self._events: list[ServerEvent] = []
        self._last_report: float | None = None
        self.send(Hello(server=server, max_audio_bytes=limits.max_audio_bytes, max_text_bytes=limits.max_text_bytes,
                        idle_timeout_s=idle_timeout))

    # --- out ------------------------------------------------------------------------------------

    def data_to_send(self) -> list[Outgoing]:
        """What to write, in order: JSON texts, and `OutgoingAudio` (write `item.live.encode(...)`)."""
        with self._lock:
            out, self._out = self._out, []
            return out

    def events_received(self) -> list[ServerEvent]:
        """What the I/O layer carries out with the engine, in order."""
        with self._lock:
            events, self._events = self._events, []
            return events

    def send(self, msg: Any) -> None:
        with self._lock:
            self._out.append(msg.encode())

    # --- the client's frames --------------------------------------------------------------------

    def receive_text(self, data: str | bytes) -> None:
        try:
            msg = parse_client_text(data, self.limits)  # outside the lock: a big message never delays a frame
        except ProtocolError as exc:
            self.refuse(exc)
            return
        with self._lock:
            self.receive_message(msg)

    def receive_message(self, msg: ClientMessage) -> None:
        """A validated client message (what `receive_text` parsed)."""
        with self._lock:
            if isinstance(msg, Start):
                if self.phase in (Phase.STARTING, Phase.LIVE):
                    self.refuse(ProtocolError(ErrorCode.SESSION_ACTIVE, "this connection already has a session: end "
                                "it first (one session per connection; open another connection for another NPC)"), msg)
                elif self.phase is Phase.CLOSING:  # after a fatal error: the connection is about to close
                    reason = self.close_code[1] if self.close_code else ErrorCode.SHUTTING_DOWN.value
                    self.refuse(ProtocolError(ErrorCode(reason), "the server is shutting down"
                                              if reason == ErrorCode.SHUTTING_DOWN.value else "this connection is closing"), msg)
                elif msg.visemes and not self.visemes:
                    self.refuse(ProtocolError(ErrorCode.VISEMES_UNAVAILABLE, "this server was started with "
                                              "--no-visemes: start without \"visemes\""), msg)
                else:
                    self.phase = Phase.STARTING
                    self._events.append(StartRequest(msg))
            elif self.phase is not Phase.LIVE:
                self.refuse(ProtocolError(ErrorCode.NO_SESSION, f"{msg.type} without a session: send start first"), msg)
            elif isinstance(msg, Switch):
                self._events.append(SwitchRequest(msg))
            elif isinstance(msg, Say):
                self._events.append(SayRequest(msg))
            elif isinstance(msg, End):
                self.end("client", ref=msg.ref)

    def receive_bytes(self, data: bytes) -> None:
        with self._lock:
            live = self.live if self.phase is Phase.LIVE else None
        try:
            if len(data) <= self.limits.max_audio_bytes and live is None:
                raise ProtocolError(ErrorCode.NO_SESSION, "audio before start: send a start message first")
            pcm16 = parse_client_audio(data, self.limits)  # message_too_large, bad_audio
        except ProtocolError as exc:
            self.refuse(exc)
            return
        samples = live.input(pcm16)
        with self._lock:
            if samples.shape[0] and live is self.live:
                self._events.append(AudioReceived(samples))

    def refuse(self, exc: BaseException, request: ClientMessage | None = None) -> None:
        """Answers `error` for a request that failed (a `ProtocolError` says its code; anything else is
        the server's fault: `internal_error`, never a closed connection). The error carries the
        request's ref; a refused `start` leaves the connection without a session."""
        if not isinstance(exc, ProtocolError):
            exc = ProtocolError(ErrorCode.INTERNAL_ERROR, f"the server failed on this message: {exc!r}"[:500])
        ref = exc.ref if exc.ref is not None else getattr(request, "ref", None)
        with self._lock:
            if isinstance(request, Start) and self.phase is not Phase.LIVE:  # (a live one refuses a second start)
                if self.phase is Phase.STARTING:
                    self.phase = Phase.IDLE
                if self.live is not None:  # accepted, never opened: no frame of it is sent
                    self.live.active = False
                    self.live = None
            self._out.append(ErrorMsg(code=exc.code.value, message=exc.message, fatal=exc.fatal, ref=ref).encode())

    # --- the engine's facts ---------------------------------------------------------------------

    def start_accepted(self, character: str, request: Start) -> LiveSession:
        """The character of a `start` is resolved (labelled `character`): the session that the engine
        is about to open, whose frames `receive_frame` takes from now on."""
        with self._lock:
            self.live = LiveSession(character, request.sample_rate, request.ref,
                                    visemes=VisemeAnalyzer() if request.visemes else None)
            return self.live

    def start_opened(self, live: LiveSession, session_id: str) -> None:
        """The engine installed the session's character: it is live (a closing connection ends it)."""
        with self._lock:
            live.session_id = session_id
            if live is not self.live:
                return
            if self.phase is Phase.CLOSING:
                self.end(self.close_code[1] if self.close_code else None)
            else:
                self.phase = Phase.LIVE

    def receive_frame(self, live: LiveSession, session_id: str, frame: int, text: str, pcm: np.ndarray) -> bool:
        """An NPC frame (the engine's `FrameEvent`: `frame` 0 is a character's first); True when it
        sent `started`. Frames of a session that ended are ignored."""
        with self._lock:
            if not live.active:
                return False
            index = live.frames
            live.frames += 1
            if index == 0:
                live.session_id = session_id
                self._out.append(Started(session=session_id, character=live.character, sample_rate=live.sample_rate,
                                         frame_samples=frame_samples(live.sample_rate), ref=live.ref).encode())
            elif frame == 0 and live.pending_switches:  # the engine installed a new character
                for ack in live.pending_switches:
                    self._out.append(ack.model_copy(update={"frame": index}).encode())
                live.character = live.pending_switches[-1].character
                live.pending_switches.clear()
                if live.visemes is not None:
                    live.visemes.reset()
            time_s = round(index * FRAME_SECONDS, 2)
            if text:
                self._out.append(Text(frame=index, time=time_s, text=text).encode())
            change = live.speech.update(index, text, pcm)
            if change is not None:
                state, at = change
                self._out.append(State(state=state, frame=at, time=round(at * FRAME_SECONDS, 2)).encode())
            before = None
            if live.visemes is not None:  # the mouth track goes out just before its frame
                jaw, names = live.visemes.frame(pcm, text)
                before = Visemes(frame=index, step_ms=STEP_MS, jaw=jaw, visemes=names).encode()
            self._out.append(OutgoingAudio(live, index, pcm, before))
            return index == 0

    def switch_accepted(self, character: str, request: Switch) -> Switched:
        """A `switch`'s character is resolved: `switched` goes out with the new character's first frame."""
        ack = Switched(character=character, frame=-1, ref=request.ref)
        with self._lock:
            if self.live is not None:
                self.live.pending_switches.append(ack)
        return ack

    def switch_settled(self, ack: Switched) -> None:
        """The engine's switch ended without an install (failed, superseded or ended): no `switched`."""
        with self._lock:
            if self.live is not None and ack in self.live.pending_switches:
                self.live.pending_switches.remove(ack)

    def input_dropped(self, total: int) -> None:
        """The engine's count of player frames dropped (sent faster than real time) for this session."""
        with self._lock:
            if self.live is not None:
                self.live.dropped_input = total

    def audio_sent(self, live: LiveSession, now: float) -> Dropped | None:
        """An audio frame of `live` was written at `now` (seconds): reports drops at most once per
        `dropped_report_s`; returns the `dropped` it queued."""
        with self._lock:
            if live is not self.live or (self._last_report is not None
                                         and now - self._last_report < self.dropped_report_s):
                return None
            out, inp = live.dropped_output, live.dropped_input
            if out == live.reported_output and inp == live.reported_input:
                return None
            self._last_report = now
            msg = Dropped(output_frames=out - live.reported_output, input_frames=inp - live.reported_input,
                          total_output_frames=out, total_input_frames=inp)
            live.reported_output, live.reported_input = out, inp
            self._out.append(msg.encode())
            return msg

    # --- endings --------------------------------------------------------------------------------

    def end(self, reason: str | None, ref: Any = None) -> LiveSession | None:
        """Ends the session (if any): `ended` with `reason` (None: the client is gone, nothing is
        sent); no frame of it is queued after this returns."""
        with self._lock:
            live, self.live = self.live, None
            if self.phase is not Phase.CLOSING:
                self.phase = Phase.IDLE
            if live is None:
                return None
            live.active = False
            self._events.append(SessionEnded(live, reason))
            if reason is not None:
                self._out.append(Ended(session=live.session_id, reason=reason, frames=live.frames,
                                       dropped_output_frames=live.dropped_output,
                                       dropped_input_frames=live.dropped_input, ref=ref).encode())
            return live

    def _fatal(self, code: ErrorCode, message: str, close: tuple[int, str]) -> None:
        with self._lock:
            if self.close_code is not None:
                return
            self._out.append(ErrorMsg(code=code.value, message=message, fatal=True).encode())
            if self.phase is not Phase.STARTING:  # a start still being carried out ends when it opens
                self.end(code.value)
            self.phase, self.close_code = Phase.CLOSING, close

    def idle_timeout(self, seconds: float) -> None:
        """Nothing received for `seconds`: `idle_timeout` (fatal), `ended`, then close 1008."""
        self._fatal(ErrorCode.IDLE_TIMEOUT, f"nothing received for {seconds:g} s: closing (send audio, silence "
                    "included, while a session is live)", (1008, ErrorCode.IDLE_TIMEOUT.value))

    def shut_down(self) -> None:
        """The server is stopping: `shutting_down` (fatal), `ended`, then close 1001."""
        self._fatal(ErrorCode.SHUTTING_DOWN, "the server is shutting down", (1001, ErrorCode.SHUTTING_DOWN.value))

    def engine_failed(self, error: BaseException) -> None:
        """The engine stopped: a live session is told (`internal_error`, then `ended` reason `error`)."""
        with self._lock:
            if self.live is not None and self.phase is Phase.LIVE:
                self._out.append(ErrorMsg(code=ErrorCode.INTERNAL_ERROR.value,
                                          message=f"the engine stopped: {error!r}").encode())
                self.end("error")
