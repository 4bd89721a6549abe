"""Reading a client's frames into messages, with every check the protocol makes (docs/protocol.md).

Pure functions: `parse_client_text` (a JSON text frame -> a validated `ClientMessage`),
`parse_client_audio` (a binary frame -> int16 samples), `decode_inline_voice`. Each refuses with a
`ProtocolError` carrying the stable code to send back. The JSON reader is hardened against hostile
input (deep nesting, huge integers, lone surrogates) in linear time.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any

import numpy as np
from pydantic import ValidationError

from .messages import (
    CLIENT_TYPES,
    DEFAULT_LIMITS,
    PROTOCOL_VERSION,
    SAMPLE_RATES,
    CharacterSpec,
    ClientMessage,
    ErrorCode,
    InlineVoice,
    Limits,
    ProtocolError,
    Say,
    Start,
    Switch,
)

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
        if not spec or len(spec) > limits.max_id_chars:  # the id rule itself: characters.resolve
            raise ProtocolError(ErrorCode.UNKNOWN_CHARACTER, f"not a character id: {len(spec)} characters",
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


def _no_constant(name: str) -> Any:
    """`NaN`, `Infinity` and `-Infinity` are not JSON (RFC 8259), though Python's decoder reads them."""
    raise ProtocolError(ErrorCode.BAD_JSON, f"not valid JSON: {name} is not a JSON value")


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


def load_json(data: str | bytes) -> Any:
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
        return json.loads(text, parse_int=_parse_int, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise ProtocolError(ErrorCode.BAD_JSON, f"not valid JSON: {exc}") from None
    except (RecursionError, ValueError) as exc:  # a safety net: the checks above should prevent these
        raise ProtocolError(ErrorCode.BAD_JSON, f"JSON this server cannot read: {str(exc)[:200]}") from None


def lone_surrogate(obj: Any, where: str = "") -> str | None:
    """Where a JSON value holds a string that is not valid Unicode (a lone surrogate such as
    "\\ud800", which JSON's escapes allow), or None. The nesting is already bounded."""
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError:
            return where or "the message"
    elif isinstance(obj, dict):
        for key, value in obj.items():
            found = lone_surrogate(key, where or "a key") or lone_surrogate(value, f"{where}.{key}".lstrip("."))
            if found:
                return found
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            found = lone_surrogate(value, f"{where}[{i}]")
            if found:
                return found
    return None


def parse_client_text(data: str | bytes, limits: Limits = DEFAULT_LIMITS) -> ClientMessage:
    """A client's JSON text frame -> a validated message; raises `ProtocolError` with the code to send."""
    size = len(data.encode("utf-8")) if isinstance(data, str) else len(data)
    if size > limits.max_text_bytes:
        raise ProtocolError(ErrorCode.MESSAGE_TOO_LARGE, f"a text message of {size} bytes; the limit is "
                            f"{limits.max_text_bytes} bytes")
    obj = load_json(data)
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
    bad = lone_surrogate(obj)
    if bad is not None:
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, f"{kind}: {bad} is not valid Unicode (a lone surrogate "
                            "escape such as \\ud800): strings must be valid UTF-16 pairs", ref=ref)
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
