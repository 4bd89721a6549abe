"""The client side of the protocol's state machines without sockets (npc_voice/protocol/client_session.py),
and a client and a server session talking to each other."""

from __future__ import annotations

import json

import numpy as np
import pytest

from npc_voice.protocol import DEFAULT_LIMITS, Hello, encode_audio_frame
from npc_voice.protocol.session import (
    Answer, AudioFrame, AudioReceived, ClientPhase, ClientSession, ServerSession, SessionEnded, StrayError,
)
from protocol_helpers import frame, new_session


def sent(client: ClientSession) -> list:
    return [json.loads(d) if isinstance(d, str) else d for d in client.data_to_send()]


def test_client_session_follows_the_server() -> None:
    client = ClientSession()
    assert client.phase is ClientPhase.CONNECTING
    client.receive_text('{"type":"hello","protocol":1,"server":"x","sample_rates":[16000,24000,48000],"frame_ms":80,'
                        '"max_audio_bytes":1,"max_text_bytes":1,"idle_timeout_s":30.0,"new_field":1}')
    assert client.phase is ClientPhase.IDLE and client.hello.server == "x"  # an unknown field is ignored
    ref = client.start("innkeeper", sample_rate=16_000, seed=3)
    assert sent(client) == [{"type": "start", "character": "innkeeper", "sample_rate": 16000, "seed": 3, "ref": ref}]
    client.receive_bytes(encode_audio_frame(0, np.zeros(1280, np.int16)))  # before `started`: ignored
    assert client.events_received()[1:] == []
    client.receive_text(f'{{"type":"started","session":"s1","character":"innkeeper","sample_rate":16000,'
                        f'"frame_samples":1280,"ref":{ref}}}')
    events = client.events_received()
    assert [type(e).__name__ for e in events] == ["Started", "Answer"] and events[1].ref == ref
    assert client.phase is ClientPhase.LIVE and client.pending == {}
    client.receive_bytes(encode_audio_frame(0, np.ones(1280, np.int16)))
    (audio,) = client.events_received()
    assert isinstance(audio, AudioFrame) and audio.frame == 0 and audio.sample_rate == 16_000
    client.audio(np.zeros(4, np.float32))
    assert sent(client) == [b"\0" * 8]
    ref = client.switch("blacksmith")
    sent(client)
    client.receive_text('{"type":"error","code":"unknown_character","message":"no","ref":%d}' % ref)
    (answer,) = client.events_received()  # an error that answers a request is not also a session event
    assert isinstance(answer, Answer) and answer.message.code == "unknown_character"
    client.receive_text('{"type":"dropped","output_frames":1,"input_frames":0,"total_output_frames":1,'
                        '"total_input_frames":0}')
    assert type(client.events_received()[0]).__name__ == "Dropped"
    with pytest.raises(ValueError):
        client.receive_text('{"type":"from_the_future"}')  # the caller ignores it
    ref = client.end()
    client.receive_text(f'{{"type":"ended","session":"s1","reason":"client","frames":2,"dropped_output_frames":1,'
                        f'"dropped_input_frames":0,"ref":{ref}}}')
    events = client.events_received()
    assert [type(e).__name__ for e in events] == ["Ended", "Answer"] and client.phase is ClientPhase.IDLE
    client.receive_text('{"type":"error","code":"no_session","message":"audio before start"}')
    assert isinstance(client.events_received()[0], StrayError)


def test_client_and_server_sessions_talk_without_sockets() -> None:
    """Each side's output fed to the other: start, frames, a switch, end."""
    server, client = new_session(), ClientSession()
    client.receive_text(ServerSession(DEFAULT_LIMITS, server="s", idle_timeout=1.0).data_to_send()[0])
    assert isinstance(client.events_received()[0], Hello)

    def to_server() -> None:
        for data in client.data_to_send():
            server.receive_text(data) if isinstance(data, str) else server.receive_bytes(data)

    def to_client() -> None:
        for item in server.data_to_send():
            if isinstance(item, str):
                client.receive_text(item)
            else:
                client.receive_bytes(item.live.encode(item.frame, item.pcm))

    start_ref = client.start("innkeeper", seed=1)
    to_server()
    (request,) = server.events_received()
    live = server.start_accepted("innkeeper", request.message)
    server.start_opened(live, "s3")
    for i in range(3):
        frame(server, live, i, " hi" if i == 1 else "", session_id="s3")
    to_client()
    events = client.events_received()
    assert [type(e).__name__ for e in events] == ["Started", "Answer", "AudioFrame", "Text", "State", "AudioFrame",
                                                  "AudioFrame"]
    assert events[1].ref == start_ref and events[0].session == "s3"
    switch_ref = client.switch("blacksmith")
    to_server()
    (request,) = server.events_received()
    server.switch_accepted("blacksmith", request.message)
    frame(server, live, 0, session_id="s3")
    to_client()
    events = client.events_received()
    assert events[0].frame == 3 and isinstance(events[1], Answer) and events[1].ref == switch_ref
    assert client.character == "blacksmith"
    client.audio(np.zeros(1920, np.int16))
    end_ref = client.end()
    to_server()
    assert [type(e) for e in server.events_received()] == [AudioReceived, SessionEnded]
    to_client()
    answer = client.events_received()[-1]
    assert answer.ref == end_ref and answer.message.frames == 4 and client.phase is ClientPhase.IDLE
