"""The protocol's state machine on the client side, without I/O (docs/protocol.md): `ClientSession`
is one connection as a client sees it, so that `npc_voice.client` (and any other Python client) only
moves bytes.

Requests go in (`start`, `switch`, `say`, `end`, `audio`: each numbered with a `ref`), the server's
frames go in (`receive_text`, `receive_bytes`); out come the data to write (`data_to_send()`) and
the events (`events_received()`): the server's messages and audio frames in order, and an `Answer`
for each reply that settles a request. No asyncio, no sockets, no threads.
"""

from __future__ import annotations

import enum
import itertools
import json
from dataclasses import dataclass
from typing import Any, Union

import numpy as np

from ..audio import float_to_pcm16, pcm16_to_float
from ..model.config import FRAME_SECONDS
from .messages import (
    MODEL_RATE, Dropped, Ended, ErrorMsg, Hello, InlineCharacter, ServerMessage, Started, State, Switched, Text,
    Visemes, decode_audio_frame, parse_server_text,
)


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


@dataclass(frozen=True)
class Answer:
    """The server's reply to request `ref`: `Started`, `Switched`, `Ended`, or the `ErrorMsg` that
    refused it (an error that answers a request is not also a session event)."""

    ref: Any
    message: ServerMessage


@dataclass(frozen=True)
class StrayError:
    """An `error` outside any session and answering no request (e.g. audio sent after `ended`)."""

    message: ErrorMsg


SessionEvent = Union[AudioFrame, Text, State, Visemes, Switched, Dropped, ErrorMsg, Ended]
ClientEvent = Union[Hello, Started, Answer, StrayError, AudioFrame, Text, State, Visemes, Switched, Dropped, ErrorMsg,
                    Ended]


class ClientPhase(str, enum.Enum):
    CONNECTING = "connecting"  # before the server's `hello`
    IDLE = "idle"  # no session (also after `ended`)
    LIVE = "live"  # between `started` and `ended`


def character_field(character: str | dict[str, Any] | InlineCharacter) -> Any:
    """A `character` as the protocol sends it: a stored id, or an inline character's JSON object."""
    return character.model_dump() if isinstance(character, InlineCharacter) else character


class ClientSession:
    """One connection's protocol, on the client side. See the module's docstring."""

    def __init__(self) -> None:
        self.phase = ClientPhase.CONNECTING
        self.hello: Hello | None = None
        self.started: Started | None = None  # the live session's (None when there is none)
        self.character: str | None = None  # the live session's character, updated by `switched`
        self.ended: Ended | None = None  # the last session's
        self.frames_received = 0  # audio frames of the live session
        self.pending: dict[Any, str] = {}  # ref -> the request type it answers
        self._refs = itertools.count(1)
        self._out: list[str | bytes] = []
        self._events: list[ClientEvent] = []

    # --- out ------------------------------------------------------------------------------------

    def data_to_send(self) -> list[str | bytes]:
        out, self._out = self._out, []
        return out

    def events_received(self) -> list[ClientEvent]:
        events, self._events = self._events, []
        return events

    # --- requests -------------------------------------------------------------------------------

    def _request(self, msg: dict[str, Any]) -> int:
        ref = next(self._refs)
        self.pending[ref] = msg["type"]
        self._out.append(json.dumps(msg | {"ref": ref}))
        return ref

    def start(self, character: str | dict[str, Any] | InlineCharacter, sample_rate: int = MODEL_RATE,
              seed: int | None = None, visemes: bool = False) -> int:
        """Queues `start`; returns its ref (answered by `started` or `error`). `visemes`: ask for the
        NPC's mouth track (a `Visemes` event before each audio frame)."""
        msg: dict[str, Any] = {"type": "start", "character": character_field(character), "sample_rate": sample_rate}
        if seed is not None:
            msg["seed"] = seed
        if visemes:
            msg["visemes"] = True
        return self._request(msg)

    def switch(self, character: str | dict[str, Any] | InlineCharacter) -> int:
        """Queues `switch`; returns its ref (answered by `switched` or `error`)."""
        return self._request({"type": "switch", "character": character_field(character)})

    def say(self, text: str) -> None:
        self._out.append(json.dumps({"type": "say", "text": text}))

    def end(self) -> int:
        """Queues `end`; returns its ref (answered by `ended` or `error`)."""
        return self._request({"type": "end"})

    def audio(self, pcm: np.ndarray | bytes) -> None:
        """Player audio: float samples in [-1, 1], int16, or PCM16 LE bytes, at the session's rate."""
        if isinstance(pcm, np.ndarray):
            if pcm.dtype != np.int16:
                pcm = float_to_pcm16(pcm)
            pcm = pcm.astype("<i2", copy=False).tobytes()
        self._out.append(bytes(pcm))

    def forget(self, ref: Any) -> None:
        """The caller stopped waiting for request `ref` (a timeout): a late reply is no `Answer`."""
        self.pending.pop(ref, None)

    # --- the server's frames --------------------------------------------------------------------

    def receive_bytes(self, data: bytes) -> None:
        """An NPC audio frame; ignored outside a session (ValueError on a malformed frame)."""
        frame, pcm = decode_audio_frame(data)
        if self.phase is ClientPhase.LIVE and self.started is not None:
            self.frames_received += 1
            self._events.append(AudioFrame(frame, pcm, self.started.sample_rate))

    def receive_text(self, data: str) -> None:
        """A server message (ValueError on an unknown type: a newer server's, to be ignored by the caller)."""
        msg = parse_server_text(data)
        ref = getattr(msg, "ref", None)
        answers = ref is not None and ref in self.pending
        if answers:
            del self.pending[ref]
        if isinstance(msg, Hello):
            self.hello = msg
            if self.phase is ClientPhase.CONNECTING:
                self.phase = ClientPhase.IDLE
            self._events.append(msg)
        elif isinstance(msg, Started):
            self.phase, self.started, self.character, self.frames_received = ClientPhase.LIVE, msg, msg.character, 0
            self._events.append(msg)
        elif isinstance(msg, Ended):
            if self.phase is ClientPhase.LIVE:
                self._events.append(msg)
            self.phase, self.started, self.ended = ClientPhase.IDLE, None, msg
        elif isinstance(msg, ErrorMsg):
            if not answers:
                self._events.append(msg if self.phase is ClientPhase.LIVE else StrayError(msg))
        else:
            if isinstance(msg, Switched):
                self.character = msg.character
            if self.phase is ClientPhase.LIVE:
                self._events.append(msg)
        if answers:
            self._events.append(Answer(ref, msg))
