"""The OpenAI Realtime protocol at `/v1/realtime`, without I/O (docs/realtime.md): `events.py` (the
events accepted and sent, error codes), `session.py` (`RealtimeSession`: data in, events out), `requests.py` (what it asks
the I/O layer to do)."""

from .events import RealtimeError, RealtimeErrorCode, parse_client_event
from .requests import (
    AudioDelta,
    Character,
    CloseConversation,
    DropScript,
    OpenConversation,
    PushAudio,
    SayLine,
    SwitchCharacter,
)
from .session import RealtimeSession

__all__ = [
    "AudioDelta", "Character", "CloseConversation", "DropScript", "OpenConversation", "PushAudio", "RealtimeError",
    "RealtimeErrorCode", "RealtimeSession", "SayLine", "SwitchCharacter", "parse_client_event",
]
