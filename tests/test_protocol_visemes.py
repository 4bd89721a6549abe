"""Visemes in the protocol, without sockets (npc_voice/protocol): only when `start` asks for them,
sent just before their frame, refused on a server without them, type-checked; the client side
turns them into events."""

from __future__ import annotations

import json

import numpy as np

from npc_voice.protocol import DEFAULT_LIMITS, ErrorCode, Visemes, encode_audio_frame
from npc_voice.protocol.session import ClientSession, OutgoingAudio, Phase, ServerSession, StartRequest

LOUD = (0.3 * np.sin(2 * np.pi * 500 * np.arange(1920) / 24_000)).astype(np.float32)


def started_server(visemes: bool | None, rate: int = 24_000, server_visemes: bool = True):
    server = ServerSession(DEFAULT_LIMITS, server="npc-voice test", idle_timeout=30.0, visemes=server_visemes)
    server.data_to_send()  # hello
    msg = {"type": "start", "character": "innkeeper", "sample_rate": rate, "ref": 1}
    if visemes is not None:
        msg["visemes"] = visemes
    server.receive_text(json.dumps(msg))
    (request,) = server.events_received()
    assert isinstance(request, StartRequest)
    live = server.start_accepted("innkeeper", request.message)
    server.start_opened(live, "s7")
    return server, live


def written(server: ServerSession) -> list:
    """What the connection writes, in order: JSON as dicts, audio as ("audio", index)."""
    out = []
    for item in server.data_to_send():
        if isinstance(item, OutgoingAudio):
            if item.before is not None:
                out.append(json.loads(item.before))
            out.append(("audio", item.frame))
        else:
            out.append(json.loads(item))
    return out


def test_visemes_only_when_asked() -> None:
    for asked in (None, False):
        server, live = started_server(asked)
        for i in range(3):
            server.receive_frame(live, "s7", i, " hi" if i == 1 else "", LOUD)
        assert not any(isinstance(m, dict) and m["type"] == "visemes" for m in written(server))


def test_each_frame_has_its_visemes_just_before_it_at_any_client_rate() -> None:
    for rate in (16_000, 24_000, 48_000):
        server, live = started_server(True, rate)
        for i in range(5):
            server.receive_frame(live, "s7", i, " hello" if i == 1 else "", LOUD if i else np.zeros(1920, np.float32))
        out = written(server)
        assert out[0]["type"] == "started"
        audio_at = [k for k, m in enumerate(out) if isinstance(m, tuple)]
        assert [out[k][1] for k in audio_at] == [0, 1, 2, 3, 4]
        for k in audio_at:
            vis = out[k - 1]
            assert vis["type"] == "visemes" and vis["frame"] == out[k][1], out
            assert vis["step_ms"] == 20 and len(vis["jaw"]) == len(vis["visemes"]) == 4  # 80 ms at the model's rate
            assert all(0 <= j <= 1 for j in vis["jaw"])
        first = out[audio_at[0] - 1]
        assert first["visemes"] == ["sil"] * 4 and first["jaw"] == [0.0] * 4  # a silent frame: closed
        assert any(j > 0 for k in audio_at[1:] for j in out[k - 1]["jaw"])  # a loud one opens it


def test_a_switch_starts_the_words_over() -> None:
    server, live = started_server(True)
    server.receive_frame(live, "s7", 0, " a long line of words", LOUD)
    assert live.visemes is not None and live.visemes.queue
    server.receive_text(json.dumps({"type": "switch", "character": "blacksmith", "ref": 2}))
    (request,) = server.events_received()
    server.switch_accepted("blacksmith", request.message)
    server.receive_frame(live, "s7", 0, "", LOUD)  # the new character's first frame
    out = written(server)
    assert any(isinstance(m, dict) and m["type"] == "switched" for m in out)
    assert out[-2]["type"] == "visemes" and out[-2]["frame"] == 1


def test_a_server_without_visemes_refuses_them() -> None:
    server = ServerSession(DEFAULT_LIMITS, server="npc-voice test", idle_timeout=30.0, visemes=False)
    server.data_to_send()
    server.receive_text(json.dumps({"type": "start", "character": "innkeeper", "visemes": True, "ref": 5}))
    (msg,) = [json.loads(m) for m in server.data_to_send()]
    assert msg["type"] == "error" and msg["code"] == ErrorCode.VISEMES_UNAVAILABLE.value == "visemes_unavailable"
    assert msg["ref"] == 5 and not msg["fatal"] and server.phase is Phase.IDLE and not server.events_received()
    server.receive_text(json.dumps({"type": "start", "character": "innkeeper", "visemes": False}))
    assert isinstance(server.events_received()[0], StartRequest)  # without them it starts


def test_visemes_must_be_a_json_boolean() -> None:
    for bad in ("yes", 1, 0, None, "true", [True]):
        server = ServerSession(DEFAULT_LIMITS, server="npc-voice test", idle_timeout=30.0)
        server.data_to_send()
        server.receive_text(json.dumps({"type": "start", "character": "innkeeper", "visemes": bad, "ref": 3}))
        (msg,) = [json.loads(m) for m in server.data_to_send()]
        assert msg["code"] == "invalid_message" and "visemes" in msg["message"] and msg["ref"] == 3, (bad, msg)
        assert not server.events_received()


def test_the_client_asks_for_visemes_and_gets_them_as_events() -> None:
    client = ClientSession()
    client.receive_text(json.dumps({"type": "hello", "server": "x", "max_audio_bytes": 1, "max_text_bytes": 1,
                                    "idle_timeout_s": 30.0}))
    client.start("innkeeper", visemes=True)
    client.start("innkeeper")
    sent = [json.loads(m) for m in client.data_to_send()]
    assert sent[0]["visemes"] is True and "visemes" not in sent[1]
    client.receive_text(json.dumps({"type": "started", "session": "s1", "character": "innkeeper", "sample_rate": 24000,
                                    "frame_samples": 1920, "ref": 1}))
    track = Visemes(frame=0, step_ms=20, jaw=[0.0, 0.1, 0.5, 0.2], visemes=["sil", "PP", "aa", "E"])
    client.receive_text(track.encode())
    client.receive_bytes(encode_audio_frame(0, np.zeros(1920, np.int16)))
    events = client.events_received()
    vis = [e for e in events if isinstance(e, Visemes)]
    assert vis == [track]
    assert events.index(vis[0]) == len(events) - 2  # before its audio frame
