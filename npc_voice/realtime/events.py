"""The OpenAI Realtime events npc-voice accepts and sends (GA schema; docs/realtime.md), without I/O.

Client events are pydantic models that ignore fields they do not know (an OpenAI client sends many
we have no use for: tools, turn detection, transcription, ...); `parse_client_event` turns a text
frame into one of them or a `RealtimeError` with a stable code. Server events are plain dicts made
by the builders below, each with a fresh `event_id`.
"""

from __future__ import annotations

import enum
import itertools
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..protocol import MODEL_RATE, ErrorCode, ProtocolError
from ..protocol.parse import load_json, lone_surrogate

PCM_RATES = (16_000, MODEL_RATE, 48_000)  # `audio/pcm` rates we convert to and from (the model runs at 24 kHz)
DEFAULT_RATE = MODEL_RATE


class RealtimeErrorCode(str, enum.Enum):
    """The `error.code` of an `error` event. Stable: never renamed; new ones may be added."""

    INVALID_JSON = "invalid_json"  # a text frame that is not a JSON object
    BINARY_NOT_SUPPORTED = "binary_not_supported"  # a binary frame (audio goes in input_audio_buffer.append)
    UNKNOWN_EVENT = "unknown_event"  # "type" names no event we accept
    INVALID_EVENT = "invalid_event"  # a known event with missing or wrong fields
    UNSUPPORTED = "unsupported"  # a valid request this server cannot honour (text-only output, user text items)
    UNSUPPORTED_FORMAT = "unsupported_format"  # an audio format other than audio/pcm at 16, 24 or 48 kHz
    INVALID_AUDIO = "invalid_audio"  # append: not base64, or not whole 16-bit samples
    CONVERSATION_NOT_STARTED = "conversation_not_started"  # needs a voice first (session.update or ?model=)
    RESPONSE_CANCEL_NOT_ACTIVE = "response_cancel_not_active"  # response.cancel while the NPC is not speaking
    ITEM_NOT_FOUND = "item_not_found"  # truncate: no such assistant item (or it is too old)
    INVALID_AUDIO_END_MS = "invalid_audio_end_ms"  # truncate: past the audio sent for that item
    # the same codes as our own protocol (docs/protocol.md)
    UNKNOWN_CHARACTER = ErrorCode.UNKNOWN_CHARACTER.value
    INVALID_CHARACTER = ErrorCode.INVALID_CHARACTER.value
    UNKNOWN_VOICE = ErrorCode.UNKNOWN_VOICE.value
    VOICE_TOO_LARGE = ErrorCode.VOICE_TOO_LARGE.value
    SERVER_BUSY = ErrorCode.SERVER_BUSY.value
    SHUTTING_DOWN = ErrorCode.SHUTTING_DOWN.value
    IDLE_TIMEOUT = ErrorCode.IDLE_TIMEOUT.value
    INTERNAL_ERROR = ErrorCode.INTERNAL_ERROR.value


SERVER_SIDE = {RealtimeErrorCode.INTERNAL_ERROR, RealtimeErrorCode.SERVER_BUSY, RealtimeErrorCode.SHUTTING_DOWN}


class RealtimeError(Exception):
    """A client event refused: `code`, a message, the offending `param` and the client's `event_id`."""

    def __init__(self, code: RealtimeErrorCode | str, message: str, *, param: str | None = None,
                 event_id: str | None = None):
        super().__init__(message)
        self.code = RealtimeErrorCode(code)
        self.message, self.param, self.event_id = message, param, event_id


# --- client events ----------------------------------------------------------------------------


class _Loose(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


class AudioFormat(_Loose):
    type: str = "audio/pcm"
    rate: int = DEFAULT_RATE


class AudioInput(_Loose):
    format: AudioFormat | None = None


class AudioOutput(_Loose):
    format: AudioFormat | None = None
    voice: str | None = None


class AudioConfig(_Loose):
    input: AudioInput | None = None
    output: AudioOutput | None = None


class SessionConfig(_Loose):
    """The fields of `session.update` we act on; any other is accepted and ignored (docs/realtime.md)."""

    type: str | None = None
    instructions: str | None = None
    voice: str | None = None  # where the beta schema had it; GA: audio.output.voice
    audio: AudioConfig | None = None
    output_modalities: list[str] | None = None

    @property
    def chosen_voice(self) -> str | None:
        out = self.audio.output if self.audio is not None else None
        return out.voice if out is not None and out.voice is not None else self.voice


class _Event(_Loose):
    event_id: str | None = None


class SessionUpdate(_Event):
    type: Literal["session.update"]
    session: SessionConfig


class InputAudioBufferAppend(_Event):
    type: Literal["input_audio_buffer.append"]
    audio: str


class InputAudioBufferCommit(_Event):
    type: Literal["input_audio_buffer.commit"]


class InputAudioBufferClear(_Event):
    type: Literal["input_audio_buffer.clear"]


class ContentPart(_Loose):
    type: str
    text: str | None = None
    transcript: str | None = None


class Item(_Loose):
    type: str = "message"
    role: str | None = None
    content: list[ContentPart] = Field(default_factory=list)
    id: str | None = None


class ConversationItemCreate(_Event):
    type: Literal["conversation.item.create"]
    item: Item
    previous_item_id: str | None = None


class ConversationItemTruncate(_Event):
    type: Literal["conversation.item.truncate"]
    item_id: str
    content_index: int = 0
    audio_end_ms: int = Field(ge=0)


class ResponseParams(_Loose):
    instructions: str | None = None
    output_modalities: list[str] | None = None


class ResponseCreate(_Event):
    type: Literal["response.create"]
    response: ResponseParams | None = None


class ResponseCancel(_Event):
    type: Literal["response.cancel"]
    response_id: str | None = None


ClientEvent = Union[SessionUpdate, InputAudioBufferAppend, InputAudioBufferCommit, InputAudioBufferClear,
                    ConversationItemCreate, ConversationItemTruncate, ResponseCreate, ResponseCancel]
EVENTS: dict[str, type[BaseModel]] = {cls.model_fields["type"].annotation.__args__[0]: cls  # type: ignore[union-attr]
                                      for cls in ClientEvent.__args__}  # type: ignore[attr-defined]


def parse_client_event(text: str) -> ClientEvent:
    """A client's text frame -> its event, or `RealtimeError` (invalid_json, unknown_event, invalid_event)."""
    try:  # the same hardened reader as our own protocol: nesting and integer size bounded
        data = load_json(text)
    except ProtocolError as exc:
        raise RealtimeError(RealtimeErrorCode.INVALID_JSON, exc.message) from None
    if not isinstance(data, dict):
        raise RealtimeError(RealtimeErrorCode.INVALID_JSON, "an event is a JSON object")
    event_id = data.get("event_id") if isinstance(data.get("event_id"), str) else None
    if event_id is not None and lone_surrogate(event_id):
        event_id = None
    bad = lone_surrogate(data)
    if bad is not None:
        raise RealtimeError(RealtimeErrorCode.INVALID_EVENT, f"{bad} is not valid Unicode (a lone surrogate escape "
                            "such as \\ud800)", param=bad, event_id=event_id)
    kind = data.get("type")
    cls = EVENTS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise RealtimeError(RealtimeErrorCode.UNKNOWN_EVENT, f"unknown or unsupported event type {str(kind)[:64]!r}; "
                            f"this server accepts: {', '.join(sorted(EVENTS))}", param="type", event_id=event_id)
    try:
        return cls.model_validate(data)  # type: ignore[return-value]
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise RealtimeError(RealtimeErrorCode.INVALID_EVENT, f"{kind}: {param}: {first['msg']}", param=param,
                            event_id=event_id) from None


# --- server events ------------------------------------------------------------------------------

_ids = itertools.count(1)


def new_id(prefix: str) -> str:
    return f"{prefix}_{next(_ids):06d}"


def event(type_: str, **fields: Any) -> dict[str, Any]:
    return {"type": type_, "event_id": new_id("event"), **fields}


def error_event(exc: RealtimeError) -> dict[str, Any]:
    kind = "server_error" if exc.code in SERVER_SIDE else "invalid_request_error"
    return event("error", error={"type": kind, "code": exc.code.value, "message": exc.message, "param": exc.param,
                                 "event_id": exc.event_id})


def audio_format(rate: int) -> dict[str, Any]:
    return {"type": "audio/pcm", "rate": rate}


def session_object(session_id: str, model: str, instructions: str, voice: str | None, in_rate: int,
                   out_rate: int) -> dict[str, Any]:
    return {"type": "realtime", "object": "realtime.session", "id": session_id, "model": model,
            "output_modalities": ["audio"], "instructions": instructions, "tools": [], "tool_choice": "none",
            "audio": {"input": {"format": audio_format(in_rate), "turn_detection": None, "transcription": None},
                      "output": {"format": audio_format(out_rate), "voice": voice, "speed": 1.0}}}


def assistant_item(item_id: str, status: str, transcript: str | None = None) -> dict[str, Any]:
    content = [] if transcript is None else [{"type": "output_audio", "transcript": transcript}]
    return {"id": item_id, "object": "realtime.item", "type": "message", "role": "assistant", "status": status,
            "content": content}


def response_object(response_id: str, status: str, output: list[dict[str, Any]],
                    reason: str | None = None) -> dict[str, Any]:
    details = None if reason is None else {"type": status, "reason": reason}
    return {"id": response_id, "object": "realtime.response", "status": status, "status_details": details,
            "output": output, "output_modalities": ["audio"], "conversation_id": "conv_npc", "usage": None}
