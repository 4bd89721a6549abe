"""The npc-voice websocket protocol, without any I/O (see docs/protocol.md).

Everything a server or a client needs to read and write messages lives here as pure functions and
pydantic models: parsing and validating client messages (`parse_client_text`, `parse_client_audio`),
encoding server messages (`ServerMessage.encode`, `encode_audio_frame`), reading them back on the
client side (`parse_server_text`, `decode_audio_frame`), the error codes, the size limits, and the
rule that turns an NPC's frames into speaking/listening states (`SpeechState`). The asyncio server
(`npc_voice.server`) and client (`npc_voice.client`) only move bytes.

Framing:
- JSON text frames carry control messages and events, one object per frame with a "type" field.
- Binary frames carry audio, 16-bit little-endian mono PCM at the session's rate. Client to server:
  the PCM alone, any length. Server to client: a 4-byte little-endian frame index, then exactly one
  80 ms frame of PCM.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import math
import re
import struct
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .model.config import FRAME_SECONDS
from .model.config import SAMPLE_RATE as MODEL_RATE  # what the model hears and says

PROTOCOL_VERSION = 1
SAMPLE_RATES = (16_000, MODEL_RATE, 48_000)  # a client may declare any of these; the server converts with soxr
FRAME_MS = round(FRAME_SECONDS * 1000)  # 80
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
    SERVER_BUSY = "server_busy"  # every conversation slot (or connection) is taken: retry later
    UNAUTHORIZED = "unauthorized"  # missing or wrong token (HTTP 401 at the handshake)
    NOT_FOUND = "not_found"  # an HTTP path that is neither the websocket endpoint nor /health (HTTP 404)
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
    ref: Ref = None


class Switch(_Msg):
    type: Literal["switch"]
    character: CharacterSpec
    ref: Ref = None


class Say(_Msg):
    type: Literal["say"]
    text: str = Field(min_length=1)
    ref: Ref = None


class End(_Msg):
    type: Literal["end"]
    ref: Ref = None


ClientMessage = Union[Start, Switch, Say, End]
CLIENT_TYPES: dict[str, type[_Msg]] = {"start": Start, "switch": Switch, "say": Say, "end": End}


_TYPE_ERRORS = {"string_type", "int_type", "model_type", "dict_type", "model_attributes_type", "none_required"}


def _loc(parts: tuple[Any, ...]) -> str:
    """A field path without pydantic's union branch tags ('str', 'int', 'InlineCharacter', ...)."""
    keep = [str(p) for p in parts if not (isinstance(p, str) and (p in ("str", "int", "none") or "-" in p
                                                                  or "[" in p or p[:1].isupper()))]
    return ".".join(keep)


def _first_error(exc: ValidationError) -> str:
    errors = exc.errors(include_url=False)
    specific = [e for e in errors if e["type"] not in _TYPE_ERRORS]
    errors = specific or errors  # in a union, the branch that matched the input's shape says more
    parts, seen = [], set()
    for err in errors:
        where = _loc(err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if isinstance(err.get("input"), _LongInt):
            msg = f"an integer of {err['input'].digits} digits; integers have at most {MAX_INT_DIGITS}"
        line = f"{where}: {msg}" if where else msg
        if line not in seen:
            seen.add(line)
            parts.append(line)
    more = f" (and {len(parts) - 3} more)" if len(parts) > 3 else ""
    return "; ".join(parts[:3]) + more


def _check_character_limits(spec: CharacterSpec, limits: Limits, ref: Any) -> None:
    if isinstance(spec, str):
        if not spec or len(spec) > limits.max_id_chars:
            raise ProtocolError(ErrorCode.UNKNOWN_CHARACTER, f"character ids have 1-{limits.max_id_chars} characters",
                                ref=ref)
        return
    if not spec.role.strip():
        raise ProtocolError(ErrorCode.INVALID_CHARACTER, "the role is empty: write who the NPC is and what it "
                            "knows", ref=ref)
    if len(spec.role) > limits.max_role_chars:
        raise ProtocolError(ErrorCode.INVALID_CHARACTER, f"the role has {len(spec.role)} characters; the limit is "
                            f"{limits.max_role_chars}", ref=ref)
    if not spec.name.strip() or len(spec.name) > limits.max_name_chars:
        raise ProtocolError(ErrorCode.INVALID_CHARACTER, f"the name has 1-{limits.max_name_chars} characters", ref=ref)
    preset = spec.voice.preset
    if preset is not None and not 0 < len(preset) <= limits.max_id_chars:
        raise ProtocolError(ErrorCode.INVALID_CHARACTER, f"voice.preset: preset names have 1-{limits.max_id_chars} "
                            "characters", ref=ref)
    b64 = spec.voice.wav_base64
    if b64 is not None and len(b64) * 3 // 4 > limits.max_voice_bytes + 3:
        raise ProtocolError(ErrorCode.VOICE_TOO_LARGE, f"the inline voice is about {len(b64) * 3 // 4} bytes; the "
                            f"limit is {limits.max_voice_bytes} bytes (send a 3-10 s sample)", ref=ref)


MAX_JSON_DEPTH = 16  # client messages nest 3 levels (start > character > voice)
MAX_INT_DIGITS = 64  # longer JSON integers are refused before Python converts them (quadratic time)
# A JSON string, or an unterminated one up to the end: possessive, so a text of many escaped quotes
# is cut in one linear pass (a plain pattern retries from every quote: quadratic).
_JSON_STRING = re.compile(r'"(?:[^"\\]++|\\.)*+(?:"|\\?\Z)', re.S)
_OPENERS, _CLOSERS = b"[{", b"]}"


class _LongInt:
    """A JSON integer of more than `MAX_INT_DIGITS` digits, left unconverted: no field accepts it."""

    def __init__(self, digits: str):
        self.digits = len(digits.lstrip("-"))

    def __repr__(self) -> str:
        return f"<an integer of {self.digits} digits>"


def _parse_int(text: str) -> int | _LongInt:
    return int(text) if len(text) - text.startswith("-") <= MAX_INT_DIGITS else _LongInt(text)


def _json_depth(text: str) -> int:
    """How deep a JSON text nests its arrays and objects (brackets inside strings do not count).

    Linear, with no Python loop over characters: strings are cut out by one regex, the brackets left
    are counted with numpy. On an invalid text the figure may be off past the first error, where the
    decoder stops anyway."""
    if text.count("[") + text.count("{") <= MAX_JSON_DEPTH:
        return 0  # cannot be deeper than the limit (the common case: no scan at all)
    bare = np.frombuffer(_JSON_STRING.sub("", text).encode("utf-8", "replace"), dtype=np.uint8)
    steps = np.zeros(bare.shape[0], dtype=np.int32)
    for ch in _OPENERS:
        steps[bare == ch] = 1
    for ch in _CLOSERS:
        steps[bare == ch] = -1
    return int(np.cumsum(steps).max(initial=0))


def _load_json(data: str | bytes) -> Any:
    """`json.loads` that refuses with `bad_json`, before decoding, a text nested deeper than
    `MAX_JSON_DEPTH` (the decoder recurses per level: RecursionError), and leaves integers over
    `MAX_INT_DIGITS` digits unconverted (Python refuses over 4300: ValueError), so that no field
    accepts them (`invalid_message`)."""
    try:
        text = data if isinstance(data, str) else data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(ErrorCode.BAD_JSON, f"not valid UTF-8: {exc}") from None
    depth = _json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise ProtocolError(ErrorCode.BAD_JSON, f"JSON nested {depth} levels deep; the limit is {MAX_JSON_DEPTH}")
    try:
        return json.loads(text, parse_int=_parse_int)
    except json.JSONDecodeError as exc:
        raise ProtocolError(ErrorCode.BAD_JSON, f"not valid JSON: {exc}") from None
    except (RecursionError, ValueError) as exc:  # a safety net: the checks above should prevent these
        raise ProtocolError(ErrorCode.BAD_JSON, f"JSON this server cannot read: {str(exc)[:200]}") from None


def parse_client_text(data: str | bytes, limits: Limits = DEFAULT_LIMITS) -> ClientMessage:
    """A client's JSON text frame -> a validated message; raises `ProtocolError` with the code to send."""
    size = len(data.encode("utf-8")) if isinstance(data, str) else len(data)
    if size > limits.max_text_bytes:
        raise ProtocolError(ErrorCode.MESSAGE_TOO_LARGE, f"a text message of {size} bytes; the limit is "
                            f"{limits.max_text_bytes} bytes")
    obj = _load_json(data)
    if not isinstance(obj, dict):
        raise ProtocolError(ErrorCode.BAD_JSON, f"expected a JSON object, got {type(obj).__name__}")
    ref = obj.get("ref")  # echoed in the error only when it is a valid ref
    ref = ref if isinstance(ref, (str, int)) and not isinstance(ref, bool) and len(str(ref)) <= 64 else None
    if isinstance(ref, str) and not ref.isascii():
        try:
            ref.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate ("\ud800" escaped in the JSON)
            ref = None
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, 'every message needs a string "type"', ref=ref)
    cls = CLIENT_TYPES.get(kind)
    if cls is None:
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown message type {kind[:40]!r}; the client messages are "
                            f"{', '.join(CLIENT_TYPES)} (and binary audio)", ref=ref)
    try:
        msg = cls.model_validate(obj)
    except ValidationError as exc:
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, f"{kind}: {_first_error(exc)}", ref=ref) from None
    if isinstance(msg, Start):
        if msg.protocol != PROTOCOL_VERSION:
            raise ProtocolError(ErrorCode.UNSUPPORTED_VERSION, f"protocol version {msg.protocol} is not supported; "
                                f"this server speaks version {PROTOCOL_VERSION}", ref=ref)
        if msg.sample_rate not in SAMPLE_RATES:
            raise ProtocolError(ErrorCode.INVALID_MESSAGE, f"start: sample_rate {msg.sample_rate} is not supported; "
                                f"use one of {', '.join(map(str, SAMPLE_RATES))}", ref=ref)
    if isinstance(msg, (Start, Switch)):
        _check_character_limits(msg.character, limits, ref)
    if isinstance(msg, Say) and len(msg.text) > limits.max_say_chars:
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, f"say: the text has {len(msg.text)} characters; the limit is "
                            f"{limits.max_say_chars}", ref=ref)
    return msg


def parse_client_audio(data: bytes, limits: Limits = DEFAULT_LIMITS) -> np.ndarray:
    """A client's binary frame -> int16 samples (PCM16 LE); raises `ProtocolError`."""
    if len(data) > limits.max_audio_bytes:
        raise ProtocolError(ErrorCode.MESSAGE_TOO_LARGE, f"an audio message of {len(data)} bytes; the limit is "
                            f"{limits.max_audio_bytes} bytes (send 20-200 ms chunks)")
    if len(data) % 2:
        raise ProtocolError(ErrorCode.BAD_AUDIO, f"an audio message of {len(data)} bytes: 16-bit PCM needs an even "
                            "byte count")
    return np.frombuffer(data, dtype="<i2")


def decode_inline_voice(voice: InlineVoice, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """The WAV bytes of an inline voice (base64, checked against the size limit)."""
    assert voice.wav_base64 is not None
    try:
        raw = base64.b64decode(voice.wav_base64, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError(ErrorCode.INVALID_CHARACTER, "voice.wav_base64 is not valid base64") from None
    if len(raw) > limits.max_voice_bytes:
        raise ProtocolError(ErrorCode.VOICE_TOO_LARGE, f"the inline voice is {len(raw)} bytes; the limit is "
                            f"{limits.max_voice_bytes} bytes")
    return raw


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
    cls.TYPE: cls for cls in (Hello, Started, Switched, Text, State, Dropped, ErrorMsg, Ended)
}


def parse_server_text(data: str) -> ServerMessage:
    """A server's JSON message -> its model (for clients). Unknown types raise ValueError."""
    obj = json.loads(data)
    kind = obj.pop("type", None)
    cls = SERVER_TYPES.get(kind)
    if cls is None:
        raise ValueError(f"unknown server message type {kind!r}")
    return cls.model_validate(obj)


def encode_audio_frame(frame: int, pcm16: np.ndarray) -> bytes:
    """Server audio: uint32 LE frame index + PCM16 LE samples."""
    return AUDIO_HEADER.pack(frame & 0xFFFFFFFF) + np.asarray(pcm16, dtype="<i2").tobytes()


def decode_audio_frame(data: bytes) -> tuple[int, np.ndarray]:
    """Server audio -> (frame index, int16 samples)."""
    if len(data) < AUDIO_HEADER.size or (len(data) - AUDIO_HEADER.size) % 2:
        raise ValueError(f"an audio frame of {len(data)} bytes")
    (frame,) = AUDIO_HEADER.unpack_from(data)
    return frame, np.frombuffer(data, dtype="<i2", offset=AUDIO_HEADER.size)


# --- speaking / listening ---------------------------------------------------------------------


class SpeechState:
    """Speaking/listening from the NPC's frames.

    A frame is *voiced* when it adds text (a non-empty piece) or its audio is at or above
    `threshold_dbfs` RMS (-40 dBFS). The NPC starts `speaking` at the first voiced frame, and goes
    back to `listening` after `hangover` (10 = 800 ms) unvoiced frames in a row; that change is
    dated at the first unvoiced frame of the run (and reported `hangover` frames later). A session
    starts `listening`.
    """

    def __init__(self, threshold_dbfs: float = -40.0, hangover: int = 10):
        self.threshold = 10.0 ** (threshold_dbfs / 20.0)
        self.hangover = hangover
        self.speaking = False
        self._quiet = 0

    @staticmethod
    def rms(pcm: np.ndarray) -> float:
        x = np.asarray(pcm, dtype=np.float32)
        return float(math.sqrt(float(np.dot(x, x)) / max(1, x.shape[0])))

    def update(self, frame: int, text: str, pcm: np.ndarray) -> tuple[str, int] | None:
        """Feeds frame `frame`; returns (new state, the frame it starts at) on a change."""
        voiced = bool(text) or self.rms(pcm) >= self.threshold
        if voiced:
            self._quiet = 0
            if not self.speaking:
                self.speaking = True
                return "speaking", frame
            return None
        self._quiet += 1
        if self.speaking and self._quiet >= self.hangover:
            self.speaking = False
            return "listening", frame - self.hangover + 1
        return None
