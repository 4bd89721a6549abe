"""The OpenAI Realtime protocol at `/v1/realtime`, without I/O (docs/realtime.md): `events.py` (the
events accepted and sent, error codes), `session.py` (`RealtimeSession`: data in, events out)."""

from .events import RealtimeError, RealtimeErrorCode, parse_client_event
from .session import (
    AudioDelta, Character, CloseConversation, DropScript, OpenConversation, PushAudio, RealtimeSession, SayLine,
    SwitchCharacter,
)

__all__ = [
    "AudioDelta", "Character", "CloseConversation", "DropScript", "OpenConversation", "PushAudio", "RealtimeError",
    "RealtimeErrorCode", "RealtimeSession", "SayLine", "SwitchCharacter", "parse_client_event",
]
