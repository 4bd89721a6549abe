"""Shared by the tests of the protocol's state machines (tests/test_protocol_server_session.py and
test_protocol_client_session.py): a `ServerSession` past its hello, a live one, and what it has to send."""

from __future__ import annotations

import json

import numpy as np

from npc_voice.protocol import DEFAULT_LIMITS, Limits
from npc_voice.protocol.session import Phase, ServerSession, StartRequest


QUIET = np.zeros(1920, np.float32)
LOUD = np.full(1920, 0.05, np.float32)


def new_session(limits: Limits = DEFAULT_LIMITS) -> ServerSession:
    server = ServerSession(limits, server="npc-voice test", idle_timeout=30.0)
    hello = messages(server)
    assert [m["type"] for m in hello] == ["hello"] and hello[0]["max_text_bytes"] == limits.max_text_bytes
    return server


def messages(server: ServerSession) -> list[dict]:
    """The JSON messages the server has to send (audio frames left out)."""
    return [json.loads(item) for item in server.data_to_send() if isinstance(item, str)]


def output(server: ServerSession) -> list:
    """Everything it has to send: JSON as dicts, audio as ("audio", frame index)."""
    return [json.loads(i) if isinstance(i, str) else ("audio", i.frame) for i in server.data_to_send()]


def live_session(rate: int = 24_000, ref=1, character: str = "innkeeper"):
    """A server session whose `start` was carried out (engine id s7); `started` not yet sent."""
    server = new_session()
    server.receive_text(json.dumps({"type": "start", "character": character, "sample_rate": rate, "ref": ref}))
    (request,) = server.events_received()
    assert isinstance(request, StartRequest) and server.phase is Phase.STARTING
    live = server.start_accepted(character, request.message)
    server.start_opened(live, "s7")
    assert server.phase is Phase.LIVE
    return server, live


def frame(server: ServerSession, live, index: int, text: str = "", pcm=QUIET, session_id: str = "s7") -> bool:
    return server.receive_frame(live, session_id, index, text, pcm)


def error_of(server: ServerSession) -> dict:
    (msg,) = messages(server)
    assert msg["type"] == "error", msg
    return msg
