"""The server side of the protocol's state machines without sockets, threads or an engine
(npc_voice/protocol/server_session.py): strings and bytes in, what to write and what to do out, as
docs/protocol.md specifies."""

from __future__ import annotations


import numpy as np
import pytest

from npc_voice.protocol import MAX_JSON_DEPTH, Limits, ProtocolError, ErrorCode, decode_audio_frame, frame_samples
from npc_voice.protocol.session import (
    AudioReceived, OutgoingAudio, Phase, SayRequest, SessionEnded, StartRequest, SwitchRequest,
)
from protocol_helpers import LOUD, error_of, frame, live_session, messages, new_session, output


def test_start_started_then_frames() -> None:
    server, live = live_session(ref="r1")
    assert frame(server, live, 0) is True
    assert output(server) == [
        {"type": "started", "session": "s7", "protocol": 1, "character": "innkeeper", "sample_rate": 24000,
         "frame_samples": 1920, "frame_ms": 80, "model_sample_rate": 24000, "ref": "r1"},
        ("audio", 0)]
    assert frame(server, live, 1, " Hello") is False
    assert output(server) == [{"type": "text", "frame": 1, "time": 0.08, "text": " Hello"},
                              {"type": "state", "state": "speaking", "frame": 1, "time": 0.08}, ("audio", 1)]
    for i in range(2, 12):
        frame(server, live, i)
    out = output(server)
    assert [o for o in out if isinstance(o, dict)] == [{"type": "state", "state": "listening", "frame": 2,
                                                        "time": 0.16}]
    assert [o[1] for o in out if isinstance(o, tuple)] == list(range(2, 12))
    assert live.frames == 12


def test_outgoing_audio_is_one_frame_at_the_clients_rate() -> None:
    for rate in (16_000, 24_000, 48_000):
        server, live = live_session(rate=rate)
        frame(server, live, 0, pcm=LOUD)
        (audio,) = [i for i in server.data_to_send() if isinstance(i, OutgoingAudio)]
        index, pcm = decode_audio_frame(audio.live.encode(audio.frame, audio.pcm))
        assert index == 0 and pcm.shape == (frame_samples(rate),)


def test_player_audio_goes_to_the_engine_at_the_models_rate() -> None:
    server, live = live_session()
    pcm = (np.arange(960) % 100).astype("<i2")
    server.receive_bytes(pcm.tobytes())
    (event,) = server.events_received()
    assert isinstance(event, AudioReceived) and event.samples.dtype == np.float32
    np.testing.assert_allclose(event.samples, pcm / 32768, atol=1e-6)
    server48, _ = live_session(rate=48_000)
    for _ in range(10):
        server48.receive_bytes(np.zeros(1920, "<i2").tobytes())  # 40 ms at 48 kHz
    got = sum(e.samples.shape[0] for e in server48.events_received())
    assert 10 * 960 - 600 <= got <= 10 * 960  # resampled to 24 kHz (less the ~20 ms the filter holds back)
    assert messages(server) == []


def test_switch_takes_effect_at_the_new_characters_first_frame() -> None:
    server, live = live_session()
    for i in range(5):
        frame(server, live, i)
    server.data_to_send()
    server.receive_text('{"type": "switch", "character": "blacksmith", "ref": 2}')
    (request,) = server.events_received()
    assert isinstance(request, SwitchRequest) and request.message.ref == 2
    server.switch_accepted("Blacksmith", request.message)
    frame(server, live, 5)  # the old character goes on until the new one is installed
    assert [o for o in output(server) if isinstance(o, dict)] == []
    frame(server, live, 0)  # the engine's frame 0: the new character's first
    assert output(server)[0] == {"type": "switched", "character": "Blacksmith", "frame": 6, "ref": 2}
    assert live.character == "Blacksmith"
    frame(server, live, 0)  # a restart without a pending switch says nothing
    assert [o for o in output(server) if isinstance(o, dict)] == []


def test_a_switch_that_fails_or_is_superseded_is_never_announced() -> None:
    server, live = live_session()
    frame(server, live, 0)
    server.data_to_send()
    server.receive_text('{"type": "switch", "character": "blacksmith", "ref": "a"}')
    (request,) = server.events_received()
    ack = server.switch_accepted("blacksmith", request.message)
    server.switch_settled(ack)
    server.refuse(ProtocolError(ErrorCode.INVALID_CHARACTER, "switch: the character's prompt could not be built"),
                  request.message)
    frame(server, live, 0)
    out = [o for o in output(server) if isinstance(o, dict)]
    assert out == [{"type": "error", "code": "invalid_character", "fatal": False, "ref": "a",
                    "message": "switch: the character's prompt could not be built"}]


def test_say_is_handed_to_the_engine_without_a_reply() -> None:
    server, _ = live_session()
    server.receive_text('{"type": "say", "text": "Welcome!"}')
    (event,) = server.events_received()
    assert isinstance(event, SayRequest) and event.message.text == "Welcome!"
    assert messages(server) == []


def test_end_answers_ended_and_no_frame_follows() -> None:
    server, live = live_session()
    for i in range(3):
        frame(server, live, i)
    server.data_to_send()
    server.receive_text('{"type": "end", "ref": 3}')
    assert messages(server) == [{"type": "ended", "session": "s7", "reason": "client", "frames": 3,
                                 "dropped_output_frames": 0, "dropped_input_frames": 0, "ref": 3}]
    (event,) = server.events_received()
    assert isinstance(event, SessionEnded) and event.live is live and event.reason == "client"
    assert frame(server, live, 3) is False and server.data_to_send() == []  # the engine may step it once more
    assert server.phase is Phase.IDLE
    server.receive_text('{"type": "start", "character": "guard"}')  # the connection may start again
    assert isinstance(server.events_received()[0], StartRequest)


def test_requests_without_a_session_are_refused_with_their_ref() -> None:
    server = new_session()
    for kind, extra in (("switch", ', "character": "x"'), ("say", ', "text": "hi"'), ("end", "")):
        server.receive_text(f'{{"type": "{kind}"{extra}, "ref": "{kind}-1"}}')
        assert error_of(server) == {"type": "error", "code": "no_session", "fatal": False, "ref": f"{kind}-1",
                                    "message": f"{kind} without a session: send start first"}
    server.receive_bytes(b"\0\0" * 100)
    assert error_of(server)["code"] == "no_session"
    assert server.events_received() == []
    server, _ = live_session()
    server.receive_text('{"type": "start", "character": "guard", "ref": 9}')
    assert error_of(server)["code"] == "session_active" and server.events_received() == []


@pytest.mark.parametrize("data, code", [
    ("not json", "bad_json"),
    ("[1, 2]", "bad_json"),
    ("[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1), "bad_json"),
    ('{"type": "start", "character": {"role": "r", "voice": {"preset": {"a": ' + "[" * 40 + "]" * 40 + "}}}}",
     "bad_json"),
    ('{"type": "strat", "character": "innkeeper"}', "unknown_type"),
    ('{"character": "innkeeper"}', "invalid_message"),
    ('{"type": "start", "character": "innkeeper", "sample_rate": "24000"}', "invalid_message"),
    ('{"type": "start", "character": "innkeeper", "seed": true}', "invalid_message"),
    ('{"type": "start", "character": 7}', "invalid_message"),
    ('{"type": "start", "character": "innkeeper", "sample_rate": 44100}', "invalid_message"),
    ('{"type": "start", "character": "innkeeper", "seed": ' + "9" * 100 + "}", "invalid_message"),
    ('{"type": "start", "character": "innkeeper", "protocol": 2}', "unsupported_version"),
    ('{"type": "say", "text": ""}', "invalid_message"),
    ('{"type": "start", "character": "' + "x" * 65 + '"}', "unknown_character"),
    ('{"type": "start", "character": {"role": " ", "voice": {"preset": "NATF2"}}}', "invalid_character"),
])
def test_malformed_messages_are_answered_and_ignored(data: str, code: str) -> None:
    for server in (new_session(), live_session()[0]):
        phase = server.phase
        server.receive_text(data)
        error = error_of(server)
        assert error["code"] == code and error["fatal"] is False
        assert server.events_received() == [] and server.phase is phase and server.close_code is None


def test_huge_and_odd_messages() -> None:
    limits = Limits(max_text_bytes=1000, max_audio_bytes=100, max_message_bytes=2000)
    server = new_session(limits)
    server.receive_text('{"type": "say", "text": "' + "a" * 2000 + '"}')
    assert error_of(server)["code"] == "message_too_large"
    server.receive_bytes(b"\0" * 102)  # too large is said before "no session"
    assert error_of(server)["code"] == "message_too_large"
    server, _ = live_session()
    server.receive_bytes(b"\0" * 3)
    assert error_of(server)["code"] == "bad_audio" and server.events_received() == []


def test_refs_are_echoed_only_when_valid() -> None:
    server = new_session()
    server.receive_text('{"type": "strat", "ref": "abc"}')
    assert error_of(server)["ref"] == "abc"
    server.receive_text('{"type": "strat", "ref": "' + "r" * 65 + '"}')
    assert "ref" not in error_of(server)
    server.receive_text('{"type": "strat", "ref": true}')
    assert "ref" not in error_of(server)


def test_a_refused_start_leaves_the_connection_idle_and_internal_faults_are_no_close() -> None:
    server = new_session()
    server.receive_text('{"type": "start", "character": "innkeeper", "ref": 5}')
    (request,) = server.events_received()
    live = server.start_accepted("innkeeper", request.message)
    server.refuse(ProtocolError(ErrorCode.SERVER_BUSY, "all 8 conversation slots are in use: retry later"),
                  request.message)
    assert error_of(server) == {"type": "error", "code": "server_busy", "fatal": False, "ref": 5,
                                "message": "all 8 conversation slots are in use: retry later"}
    assert server.phase is Phase.IDLE and frame(server, live, 0) is False
    server.receive_text('{"type": "start", "character": "innkeeper", "ref": 6}')
    (request,) = server.events_received()
    server.refuse(RuntimeError("a bug"), request.message)
    error = error_of(server)
    assert error["code"] == "internal_error" and error["ref"] == 6 and "a bug" in error["message"]
    assert server.close_code is None and server.phase is Phase.IDLE


def test_drop_reports() -> None:
    server, live = live_session()
    for i in range(3):
        frame(server, live, i)
    server.data_to_send()
    assert server.audio_sent(live, 100.0) is None  # nothing dropped: nothing said
    live.dropped_output += 4  # the outbox dropped four frames the client read too slowly
    server.input_dropped(2)  # the engine dropped two frames the client sent too fast
    report = server.audio_sent(live, 100.5)
    assert messages(server) == [{"type": "dropped", "output_frames": 4, "input_frames": 2,
                                 "total_output_frames": 4, "total_input_frames": 2}] and report is not None
    live.dropped_output += 1
    assert server.audio_sent(live, 101.0) is None and messages(server) == []  # at most one report per second
    assert server.audio_sent(live, 101.6) is not None
    assert messages(server)[0] == {"type": "dropped", "output_frames": 1, "input_frames": 0,
                                   "total_output_frames": 5, "total_input_frames": 2}
    server.receive_text('{"type": "end"}')
    ended = messages(server)[0]
    assert ended["dropped_output_frames"] == 5 and ended["dropped_input_frames"] == 2


def test_idle_timeout_and_shutdown_are_fatal_and_close() -> None:
    server, live = live_session()
    server.idle_timeout(30.0)
    out = messages(server)
    assert [m["type"] for m in out] == ["error", "ended"]
    assert out[0]["code"] == "idle_timeout" and out[0]["fatal"] is True and out[1]["reason"] == "idle_timeout"
    assert server.close_code == (1008, "idle_timeout") and server.phase is Phase.CLOSING
    assert isinstance(server.events_received()[0], SessionEnded)
    server.shut_down()  # already closing: nothing more
    assert messages(server) == []

    server = new_session()
    server.shut_down()
    assert [(m["type"], m["code"], m["fatal"]) for m in messages(server)] == [("error", "shutting_down", True)]
    assert server.close_code == (1001, "shutting_down")
    server.receive_text('{"type": "start", "character": "innkeeper"}')
    assert error_of(server)["code"] == "shutting_down" and server.events_received() == []


def test_a_start_carried_out_while_the_server_stops_ends_at_once() -> None:
    server = new_session()
    server.receive_text('{"type": "start", "character": "innkeeper", "ref": 1}')
    (request,) = server.events_received()
    live = server.start_accepted("innkeeper", request.message)
    server.shut_down()
    assert [m["type"] for m in messages(server)] == ["error"]
    server.start_opened(live, "s9")
    assert messages(server) == [{"type": "ended", "session": "s9", "reason": "shutting_down", "frames": 0,
                                 "dropped_output_frames": 0, "dropped_input_frames": 0}]
    assert isinstance(server.events_received()[0], SessionEnded)


def test_engine_failure_ends_the_live_session() -> None:
    server, live = live_session()
    frame(server, live, 0)
    server.data_to_send()
    server.engine_failed(RuntimeError("cuda"))
    out = messages(server)
    assert [(m["type"], m.get("code"), m.get("reason")) for m in out] == [
        ("error", "internal_error", None), ("ended", None, "error")]
    assert server.close_code is None  # the connection stays open
