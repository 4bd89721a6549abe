"""The npc-voice websocket protocol's messages, constants, error codes and limits (docs/protocol.md).

Pydantic models of every client message (`Start`, `Switch`, `Say`, `End`) and server message
(`Hello`, `Started`, ... `ServerMessage.encode`), the binary audio framing (`encode_audio_frame`,
`decode_audio_frame`), the stable error codes and the size limits. Reading a client's bytes into
these models, with every check the protocol makes, is `npc_voice.protocol.parse`.

Framing:
- JSON text frames carry control messages and events, one object per frame with a "type" field.
- Binary frames carry audio, 16-bit little-endian mono PCM at the session's rate. Client to server:
  the PCM alone, any length. Server to client: a 4-byte little-endian frame index, then exactly one
  80 ms frame of PCM.
"""

from __future__ import annotations

import enum
import json
import struct
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..model.config import FRAME_MS
from ..model.config import SAMPLE_RATE as MODEL_RATE  # what the model hears and says

PROTOCOL_VERSION = 1
SAMPLE_RATES = (16_000, MODEL_RATE, 48_000)  # a client may declare any of these; the server converts with soxr
WS_PATH = "/ws"
HEALTH_PATH = "/health"
AUDIO_HEADER = struct.Struct("<I")  # server audio frames: uint32 LE frame index, then PCM16 LE


def frame_samples(rate: int) -> int:
    """Samples in one 80 ms frame at `rate` (1280 at 16 kHz, 1920 at 24 kHz, 3840 at 48 kHz)."""
    return rate * FRAME_MS // 1000


class ErrorCode(str, enum.Enum):
    """Stable error codes (the `code` of an `error` message). Never renamed; new ones may be added."""

    BAD_JSON = "bad_json"  # a text frame that is not a JSON object
    UNKNOWN_TYPE = "unknown_type"  # "type" names no client message
    INVALID_MESSAGE = "invalid_message"  # a known type with missing, extra or wrong fields
    UNSUPPORTED_VERSION = "unsupported_version"  # start asked for a protocol version the server does not speak
    NO_SESSION = "no_session"  # audio, switch, say or end without a started session
    SESSION_ACTIVE = "session_active"  # start while this connection already has a session
    BAD_AUDIO = "bad_audio"  # a binary frame that is not whole 16-bit samples (odd byte count)
    MESSAGE_TOO_LARGE = "message_too_large"  # over the per-kind size limit (the message is dropped)
    VOICE_TOO_LARGE = "voice_too_large"  # an inline voice over the size or duration limit
    UNKNOWN_CHARACTER = "unknown_character"  # no character with that id (or an id that is not a valid id)
    INVALID_CHARACTER = "invalid_character"  # an inline character or stored character that cannot be used
    UNKNOWN_VOICE = "unknown_voice"  # an inline character's voice preset that does not exist
    VISEMES_UNAVAILABLE = "visemes_unavailable"  # start asked for visemes of a server started with --no-visemes
    SERVER_BUSY = "server_busy"  # every conversation slot (or connection) is taken: retry later
    UNAUTHORIZED = "unauthorized"  # missing or wrong token (HTTP 401 at the handshake)
    NOT_FOUND = "not_found"  # an HTTP path that is neither the websocket endpoint nor /health (HTTP 404)
    UPGRADE_REQUIRED = "upgrade_required"  # a plain HTTP request to a websocket endpoint (HTTP 426)
    IDLE_TIMEOUT = "idle_timeout"  # nothing received for the idle timeout: the connection is closed
    SHUTTING_DOWN = "shutting_down"  # the server is stopping
    INTERNAL_ERROR = "internal_error"  # a server fault; the message says what


class ProtocolError(Exception):
    """A message the server refuses: carries the stable code sent back to the client."""

    def __init__(self, code: ErrorCode, message: str, *, fatal: bool = False, ref: str | int | None = None):
        super().__init__(message)
        self.code, self.message, self.fatal, self.ref = code, message, fatal, ref

    def to_message(self) -> ErrorMsg:
        return ErrorMsg(code=self.code.value, message=self.message, fatal=self.fatal, ref=self.ref)


@dataclass(frozen=True)
class Limits:
    """Size limits. A message over its kind's limit is answered with `message_too_large` and dropped;
    one over `max_message_bytes` (the transport limit) closes the connection with code 1009."""

    max_message_bytes: int = 4 << 20  # any frame (the websocket library refuses bigger ones)
    max_text_bytes: int = 3 << 20  # one JSON message (room for an inline voice in base64)
    max_audio_bytes: int = 256 << 10  # one binary audio message (2.7 s at 48 kHz, 8 s at 16 kHz)
    max_voice_bytes: int = 2 << 20  # an inline voice WAV, decoded from base64
    max_voice_seconds: float = 20.0  # an inline voice's duration
    max_role_chars: int = 8000
    max_say_chars: int = 1000
    max_name_chars: int = 64
    max_id_chars: int = 64

    def __post_init__(self) -> None:
        if max(self.max_text_bytes, self.max_audio_bytes) > self.max_message_bytes:
            raise ValueError("max_text_bytes and max_audio_bytes must not exceed max_message_bytes")


DEFAULT_LIMITS = Limits()


# --- client -> server -------------------------------------------------------------------------

Ref = Union[Annotated[str, Field(max_length=64)], int, None]  # echoed in replies


class _Msg(BaseModel):
    # strict: a JSON integer is an integer (not "7", 7.0 or true), a string is a string (not 7)
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class InlineVoice(_Msg):
    """Exactly one of: a WAV/FLAC/OGG sample in base64, or the name of a preset voice on the server."""

    wav_base64: str | None = None
    preset: str | None = None  # its length and form are checked as the character's (invalid_character)

    @model_validator(mode="after")
    def _one_voice(self) -> InlineVoice:
        if (self.wav_base64 is None) == (self.preset is None):
            raise ValueError("give exactly one of voice.wav_base64 or voice.preset")
        return self


class InlineCharacter(_Msg):
    """A character defined by the client: a role prompt and a voice. The schema only checks types:
    the values (an empty role, a bad preset name, ...) are the character's rules, `invalid_character`."""

    role: str
    voice: InlineVoice
    name: str = "npc"


CharacterSpec = Union[str, InlineCharacter]  # a stored character's id, or an inline character


class Start(_Msg):
    type: Literal["start"]
    character: CharacterSpec
    sample_rate: int = MODEL_RATE
    protocol: int = PROTOCOL_VERSION
    seed: int | None = Field(default=None, ge=0, lt=2**31)
    visemes: bool = False  # a `visemes` message (mouth track) before each NPC audio frame
    ref: Ref = None


class Switch(_Msg):
    type: Literal["switch"]
    character: CharacterSpec
    ref: Ref = None


class Say(_Msg):
    type: Literal["say"]
    text: str = Field(min_length=1)
    ref: Ref = None

    @field_validator("text")
    @classmethod
    def _not_blank(cls, text: str) -> str:
        if not text.strip():
            raise ValueError("the line is only white space: give the NPC something to say")
        return text


class End(_Msg):
    type: Literal["end"]
    ref: Ref = None


ClientMessage = Union[Start, Switch, Say, End]
CLIENT_TYPES: dict[str, type[_Msg]] = {"start": Start, "switch": Switch, "say": Say, "end": End}


# --- server -> client -------------------------------------------------------------------------


class ServerMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    TYPE: ClassVar[str] = ""

    def encode(self) -> str:
        return json.dumps({"type": self.TYPE, **self.model_dump(exclude_none=True)}, separators=(",", ":"))


class Hello(ServerMessage):
    """Sent once when the connection opens."""

    TYPE: ClassVar[str] = "hello"
    protocol: int = PROTOCOL_VERSION
    server: str
    sample_rates: list[int] = list(SAMPLE_RATES)
    frame_ms: int = FRAME_MS
    max_audio_bytes: int
    max_text_bytes: int
    idle_timeout_s: float


class Started(ServerMessage):
    """The session is live; frame 0 (the first NPC frame) follows."""

    TYPE: ClassVar[str] = "started"
    session: str
    protocol: int = PROTOCOL_VERSION
    character: str
    sample_rate: int  # both directions
    frame_samples: int  # samples per binary audio frame from the server, at sample_rate
    frame_ms: int = FRAME_MS
    model_sample_rate: int = MODEL_RATE
    ref: str | int | None = None


class Switched(ServerMessage):
    """The new character speaks from `frame` on (its conversation starts over)."""

    TYPE: ClassVar[str] = "switched"
    character: str
    frame: int
    ref: str | int | None = None


class Text(ServerMessage):
    """A piece of the NPC's words, shown at `time` = frame * 0.08 s (subtitles)."""

    TYPE: ClassVar[str] = "text"
    frame: int
    time: float
    text: str


class State(ServerMessage):
    """The NPC started speaking or went back to listening at `frame` (see `SpeechState`)."""

    TYPE: ClassVar[str] = "state"
    state: Literal["speaking", "listening"]
    frame: int
    time: float


class Visemes(ServerMessage):
    """The mouth track of NPC audio frame `frame` (sent just before it, when `start` asked for
    visemes): per `step_ms` step, a jaw opening 0-1 and one of the 15 Oculus visemes
    (npc_voice.visemes)."""

    TYPE: ClassVar[str] = "visemes"
    frame: int
    step_ms: int
    jaw: list[float]
    visemes: list[str]


class Dropped(ServerMessage):
    """Audio frames lost since the last report: `output` (the client read too slowly) and `input`
    (the client sent faster than real time); totals since the session started."""

    TYPE: ClassVar[str] = "dropped"
    output_frames: int
    input_frames: int
    total_output_frames: int
    total_input_frames: int


class ErrorMsg(ServerMessage):
    TYPE: ClassVar[str] = "error"
    code: str
    message: str
    fatal: bool = False  # true: the server closes the connection after this message
    ref: str | int | None = None


class Ended(ServerMessage):
    """The session is over (the connection stays open for another start unless the reason is fatal)."""

    TYPE: ClassVar[str] = "ended"
    session: str
    reason: Literal["client", "idle_timeout", "shutting_down", "error"]
    frames: int  # NPC frames produced
    dropped_output_frames: int
    dropped_input_frames: int
    ref: str | int | None = None


SERVER_TYPES: dict[str, type[ServerMessage]] = {
    cls.TYPE: cls for cls in (Hello, Started, Switched, Text, State, Visemes, Dropped, ErrorMsg, Ended)
}


def parse_server_text(data: str) -> ServerMessage:
    """A server's JSON message -> its model (for clients). Unknown types raise ValueError; unknown
    fields are left out (docs/protocol.md: version 1 grows new optional fields, clients ignore them)."""
    obj = json.loads(data)
    kind = obj.pop("type", None)
    cls = SERVER_TYPES.get(kind)
    if cls is None:
        raise ValueError(f"unknown server message type {kind!r}")
    return cls.model_validate({k: v for k, v in obj.items() if k in cls.model_fields})


def encode_audio_frame(frame: int, pcm16: np.ndarray) -> bytes:
    """Server audio: uint32 LE frame index + PCM16 LE samples."""
    return AUDIO_HEADER.pack(frame & 0xFFFFFFFF) + np.asarray(pcm16, dtype="<i2").tobytes()


def decode_audio_frame(data: bytes) -> tuple[int, np.ndarray]:
    """Server audio -> (frame index, int16 samples)."""
    if len(data) < AUDIO_HEADER.size or (len(data) - AUDIO_HEADER.size) % 2:
        raise ValueError(f"an audio frame of {len(data)} bytes")
    (frame,) = AUDIO_HEADER.unpack_from(data)
    return frame, np.frombuffer(data, dtype="<i2", offset=AUDIO_HEADER.size)
