"""The protocol's two state machines, without I/O: `ServerSession` (a connection as the server sees
it, `server_session.py`) and `ClientSession` (as a client sees it, `client_session.py`)."""

from .client_session import (
    Answer,
    AudioFrame,
    ClientEvent,
    ClientPhase,
    ClientSession,
    StrayError,
    character_field,
)
from .server_session import (
    AudioReceived,
    LiveSession,
    OutgoingAudio,
    Phase,
    SayRequest,
    ServerEvent,
    ServerSession,
    SessionEnded,
    StartRequest,
    SwitchRequest,
)

__all__ = [
    "Answer", "AudioFrame", "AudioReceived", "ClientEvent", "ClientPhase", "ClientSession", "LiveSession",
    "OutgoingAudio", "Phase", "SayRequest", "ServerEvent", "ServerSession", "SessionEnded", "StartRequest",
    "StrayError", "SwitchRequest", "character_field",
]
