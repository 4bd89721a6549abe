"""The npc-voice websocket protocol, without any I/O (docs/protocol.md), as the `websockets` library
does it: everything a server or a client decides lives here, the asyncio code only moves bytes.

- `messages`: the message models, constants, error codes and limits;
- `parse`: a client's frames -> validated messages (or the `ProtocolError` to answer);
- `speech`: the speaking/listening rule (`SpeechState`);
- `rates`: the client's sample rate <-> the model's, and exact 80 ms frames;
- `session`: the state machines, `ServerSession` (one connection, seen from the server) and
  `ClientSession` (seen from the client): data in, events and data to send out.

The names other modules import from `npc_voice.protocol` are re-exported here.
"""

from ..model.config import FRAME_MS, FRAME_SECONDS  # owned by the model's config; re-exported for clients
from .messages import (
    AUDIO_HEADER, CLIENT_TYPES, DEFAULT_LIMITS, HEALTH_PATH, MODEL_RATE, PROTOCOL_VERSION, SAMPLE_RATES, SERVER_TYPES,
    WS_PATH, CharacterSpec, ClientMessage, Dropped, End, Ended, ErrorCode, ErrorMsg, Hello, InlineCharacter,
    InlineVoice, Limits, ProtocolError, Ref, Say, ServerMessage, Start, Started, State, Switch, Switched, Text,
    Visemes, decode_audio_frame, encode_audio_frame, frame_samples, parse_server_text,
)
from .parse import MAX_INT_DIGITS, MAX_JSON_DEPTH, decode_inline_voice, parse_client_audio, parse_client_text
from .rates import InputConverter, OutputFramer
from .session import ClientSession, ServerSession
from .speech import SpeechState

__all__ = [
    "AUDIO_HEADER", "CLIENT_TYPES", "DEFAULT_LIMITS", "FRAME_MS", "FRAME_SECONDS", "HEALTH_PATH", "MAX_INT_DIGITS",
    "MAX_JSON_DEPTH", "MODEL_RATE", "PROTOCOL_VERSION", "SAMPLE_RATES", "SERVER_TYPES", "WS_PATH", "CharacterSpec",
    "ClientMessage", "Dropped", "End", "Ended", "ErrorCode", "ErrorMsg", "Hello", "InlineCharacter", "InlineVoice",
    "Limits", "ProtocolError", "InputConverter", "OutputFramer", "ClientSession", "ServerSession", "Ref", "Say", "ServerMessage", "SpeechState", "Start", "Started", "State", "Switch",
    "Switched", "Text", "Visemes", "decode_audio_frame", "decode_inline_voice", "encode_audio_frame", "frame_samples",
    "parse_client_audio", "parse_client_text", "parse_server_text",
]
