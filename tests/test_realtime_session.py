"""`RealtimeSession` and the Realtime events (npc_voice/realtime), without sockets or an engine."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from npc_voice.realtime import (
    AudioDelta, Character, CloseConversation, DropScript, OpenConversation, PushAudio, RealtimeError, RealtimeErrorCode,
    RealtimeSession, SayLine, SwitchCharacter, parse_client_event,
)

LOUD = (0.3 * np.sin(np.arange(1920) / 5)).astype(np.float32)
QUIET = np.zeros(1920, np.float32)


def types(session: RealtimeSession) -> list[str]:
    return [json.loads(x)["type"] if isinstance(x, str) else "delta" for x in session.data_to_send()]


def events(session: RealtimeSession) -> list[dict]:
    return [json.loads(x) for x in session.data_to_send() if isinstance(x, str)]


def send(_s: RealtimeSession, **ev) -> None:
    _s.receive_text(json.dumps(ev))


def live(voice: str = "innkeeper") -> RealtimeSession:
    s = RealtimeSession("gpt-realtime")
    assert types(s) == ["session.created"] and s.requests() == []
    send(s, type="session.update", session={"type": "realtime", "audio": {"output": {"voice": voice}}})
    assert s.requests() == [OpenConversation(Character(voice))] and types(s) == []  # answered once it is open
    s.opened(Character(voice))
    assert types(s) == ["session.updated"] and s.phase == "live"
    return s


def test_model_in_the_url_opens_a_stored_character() -> None:
    s = RealtimeSession("innkeeper", known_character=lambda n: n == "innkeeper")
    assert s.requests() == [OpenConversation(Character("innkeeper"))]
    (created,) = events(s)  # names the character it opens as the voice
    assert created["type"] == "session.created" and created["session"]["audio"]["output"]["voice"] == "innkeeper"
    s = RealtimeSession("gpt-realtime", known_character=lambda n: n == "innkeeper")
    assert s.requests() == []


def test_parse_errors_have_stable_codes() -> None:
    cases = [("nope", "invalid_json"), ("[1]", "invalid_json"), ('{"type": "bogus"}', "unknown_event"),
             ('{"type": "input_audio_buffer.append"}', "invalid_event"),
             ('{"type": "conversation.item.truncate", "item_id": "x", "audio_end_ms": -1}', "invalid_event")]
    for text, code in cases:
        with pytest.raises(RealtimeError) as info:
            parse_client_event(text)
        assert info.value.code.value == code, text
    s = RealtimeSession()
    s.data_to_send()
    s.receive_text('{"type": "bogus", "event_id": "e1"}')
    s.receive_bytes(b"\0\0")
    (e1, e2) = events(s)
    assert e1["type"] == "error" and e1["error"]["code"] == "unknown_event" and e1["error"]["event_id"] == "e1"
    assert e1["error"]["type"] == "invalid_request_error" and e2["error"]["code"] == "binary_not_supported"


def test_session_update_formats_and_refusals() -> None:
    s = RealtimeSession()
    s.data_to_send()
    send(s, type="session.update", session={"instructions": "Be terse.", "tools": [{"type": "function"}],
                                            "audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}}}})
    (updated,) = events(s)
    assert updated["type"] == "session.updated" and updated["session"]["instructions"] == "Be terse."
    assert updated["session"]["audio"]["input"]["format"]["rate"] == 16000 and s.requests() == []
    for session, code in [({"audio": {"output": {"format": {"type": "audio/pcmu"}}}}, "unsupported_format"),
                          ({"audio": {"input": {"format": {"type": "audio/pcm", "rate": 8000}}}}, "unsupported_format"),
                          ({"output_modalities": ["text"]}, "unsupported")]:
        send(s, type="session.update", session=session, event_id="u")
        (err,) = events(s)
        assert err["error"]["code"] == code and err["error"]["event_id"] == "u"
    # a voice now opens the conversation with the instructions set before
    send(s, type="session.update", session={"voice": "NATF2"}, event_id="v1")
    assert s.requests() == [OpenConversation(Character("NATF2", "Be terse."))]
    s.refused(RealtimeError("unknown_character", "no such voice"))
    (err,) = events(s)  # carries the event_id of the session.update that asked (docs/realtime.md)
    assert (err["error"]["code"], err["error"]["event_id"]) == ("unknown_character", "v1") and s.phase == "idle"
    send(s, type="response.create", response={"instructions": "Hello"})
    assert [e["error"]["code"] for e in events(s)] == ["conversation_not_started"]


def test_a_refused_role_is_not_kept() -> None:
    """Instructions the server cannot use (a role too long for the context) are refused with
    `invalid_character` naming `session.instructions`, and forgotten: the next voice change goes
    through with the running character's instructions, not the refused ones."""
    s = live()
    s.data_to_send()
    send(s, type="session.update", session={"instructions": "x " * 3000}, event_id="long")
    assert s.requests() == [SwitchCharacter(Character("innkeeper", ("x " * 3000).strip()))]
    s.refused(RealtimeError("invalid_character", "role is 6012 tokens", param="session.audio.output.voice"))
    (err,) = events(s)
    assert err["error"]["param"] == "session.instructions" and err["error"]["event_id"] == "long"
    assert s.instructions is None and s.wanted == Character("innkeeper")
    send(s, type="session.update", session={"audio": {"output": {"voice": "blacksmith"}}})
    assert s.requests() == [SwitchCharacter(Character("blacksmith"))]  # not the refused role


def test_audio_in_is_converted_and_dropped_before_the_conversation() -> None:
    s = RealtimeSession()
    chunk = base64.b64encode(np.full(1920, 1000, "<i2").tobytes()).decode()
    send(s, type="input_audio_buffer.append", audio=chunk)
    assert s.requests() == [] and s.discarded_input_ms == 80
    send(s, type="input_audio_buffer.append", audio="%%%")
    send(s, type="input_audio_buffer.append", audio=base64.b64encode(b"abc").decode())
    assert [e.get("error", {}).get("code") for e in events(s)][-2:] == ["invalid_audio", "invalid_audio"]
    s = live()
    send(s, type="input_audio_buffer.append", audio=chunk)
    (push,) = s.requests()
    assert isinstance(push, PushAudio) and push.samples.dtype == np.float32 and push.samples.shape == (1920,)
    assert abs(push.samples[0] - 1000 / 32768) < 1e-6
    send(s, type="input_audio_buffer.commit")
    send(s, type="input_audio_buffer.clear")
    assert types(s) == ["input_audio_buffer.committed", "input_audio_buffer.cleared"] and s.requests() == []


def test_a_stretch_of_speech_is_one_response_and_the_turn_goes_back() -> None:
    s = live()
    s.receive_frame(0, "", QUIET)  # listening: nothing is sent
    assert s.data_to_send() == []
    s.receive_frame(1, " Hel", LOUD)
    s.receive_frame(2, "lo", LOUD)
    out = s.data_to_send()
    kinds = [json.loads(x)["type"] if isinstance(x, str) else "delta" for x in out]
    assert kinds == ["response.created", "response.output_item.added", "conversation.item.added",
                     "response.content_part.added", "response.output_audio_transcript.delta", "delta",
                     "response.output_audio_transcript.delta", "delta"]
    delta = out[5]
    assert isinstance(delta, AudioDelta)
    rendered = json.loads(delta.render())
    assert rendered["type"] == "response.output_audio.delta" and len(base64.b64decode(rendered["delta"])) == 3840
    for f in range(3, 13):  # 10 quiet frames: the NPC yields, dated at frame 3
        s.receive_frame(f, "", QUIET)
    evs = events(s)
    kinds = [e["type"] for e in evs]
    assert kinds == ["input_audio_buffer.speech_started", "response.output_audio.done",
                     "response.output_audio_transcript.done", "response.content_part.done",
                     "response.output_item.done", "conversation.item.done", "response.done"]
    assert evs[0]["audio_start_ms"] == 240 and evs[2]["transcript"] == " Hello"
    done = evs[-1]["response"]
    assert done["status"] == "completed" and done["output"][0]["content"][0]["transcript"] == " Hello"
    s.receive_frame(13, " Yes", LOUD)  # the NPC takes the turn back: a new response
    kinds = types(s)
    assert kinds[0] == "input_audio_buffer.speech_stopped" and kinds[1] == "response.created"


def test_cancel_truncate_and_scripted_lines() -> None:
    s = live()
    send(s, type="response.cancel", event_id="c0")
    assert [e["error"]["code"] for e in events(s)] == ["response_cancel_not_active"]
    for f in range(5):
        s.receive_frame(f, "ab", LOUD)
    item_id = [e for e in events(s) if e["type"] == "response.output_item.added"][0]["item"]["id"]
    send(s, type="conversation.item.truncate", item_id=item_id, content_index=0, audio_end_ms=1000)
    assert [e["error"]["code"] for e in events(s)] == ["invalid_audio_end_ms"]  # only 400 ms were sent
    send(s, type="conversation.item.truncate", item_id="item_x", content_index=0, audio_end_ms=0)
    assert [e["error"]["code"] for e in events(s)] == ["item_not_found"]
    send(s, type="conversation.item.truncate", item_id=item_id, content_index=1, audio_end_ms=200)
    assert [(e["error"]["code"], e["error"]["param"]) for e in events(s)] == [("invalid_event", "content_index")]
    send(s, type="conversation.item.truncate", item_id=item_id, content_index=0, audio_end_ms=200)
    assert s.requests() == [DropScript()]
    evs = events(s)
    done = [e for e in evs if e["type"] == "response.done"][0]["response"]
    assert done["status"] == "cancelled" and done["output"][0]["content"][0]["transcript"] == "ababab"  # 0, 80, 160 ms
    assert evs[-1] == {**evs[-1], "type": "conversation.item.truncated", "audio_end_ms": 200, "item_id": item_id}
    # the item is now 240 ms of audio (whole frames): a later truncate may shorten it, not lengthen it
    send(s, type="conversation.item.truncate", item_id=item_id, content_index=0, audio_end_ms=320)
    assert [e["error"]["code"] for e in events(s)] == ["invalid_audio_end_ms"]
    send(s, type="conversation.item.truncate", item_id=item_id, content_index=0, audio_end_ms=100)
    assert [e["type"] for e in events(s)] == ["conversation.item.truncated"]
    s.receive_frame(5, "ab", LOUD)  # the rest of this stretch is not sent
    assert s.data_to_send() == []
    send(s, type="conversation.item.create", item={"type": "message", "role": "assistant",
                                                   "content": [{"type": "output_text", "text": "Welcome!"}]})
    send(s, type="response.create", response={"instructions": "Mind the snow."})
    send(s, type="response.create")
    assert s.requests() == [SayLine("Welcome!"), SayLine("Mind the snow.")]
    assert types(s) == ["conversation.item.added", "conversation.item.done"]
    send(s, type="conversation.item.create", item={"type": "message", "role": "user",
                                                   "content": [{"type": "input_text", "text": "hi"}]})
    assert [e["error"]["code"] for e in events(s)] == ["unsupported"]


def test_a_voice_change_is_a_switch_and_the_new_character_starts_a_response() -> None:
    s = live()
    for f in range(3):
        s.receive_frame(f, "x", LOUD)
    s.data_to_send()
    send(s, type="session.update", session={"instructions": "You sell swords.", "audio": {"output": {"voice": "blacksmith"}}})
    assert s.requests() == [SwitchCharacter(Character("blacksmith", "You sell swords."))] and types(s) == []
    send(s, type="session.update", session={"audio": {"output": {"voice": "teacher"}}})  # waits for the first
    assert s.requests() == []
    s.switched(Character("blacksmith", "You sell swords."))
    assert s.requests() == [SwitchCharacter(Character("teacher", "You sell swords."))]
    s.switched(Character("teacher", "You sell swords."))
    updated = events(s)
    assert [e["type"] for e in updated] == ["session.updated", "session.updated"]
    assert updated[-1]["session"]["audio"]["output"]["voice"] == "teacher"
    s.receive_frame(0, "y", LOUD)  # the new character's first frame ends the old response
    kinds = types(s)
    assert kinds.index("response.done") < kinds.index("response.created")
    s.ended("shutting_down", "bye", close=(1001, "server shutting down"))
    assert s.requests() == [CloseConversation()] and s.close_code == (1001, "server shutting down")
    evs = events(s)
    assert evs[-1]["error"]["code"] == "shutting_down" and evs[-1]["error"]["type"] == "server_error"
    assert [e for e in evs if e["type"] == "response.done"][0]["response"]["status"] == "incomplete"


def test_deep_nesting_and_lone_surrogates_are_answered_not_faults() -> None:
    """The Realtime reader is the protocol's hardened one: 1000 levels of nesting are invalid_json
    (was a RecursionError, internal_error), and instructions with a lone surrogate are
    invalid_event with the client's event_id (was accepted, then an internal_error at open)."""
    with pytest.raises(RealtimeError) as info:
        parse_client_event("[" * 1000 + "]" * 1000)
    assert info.value.code == RealtimeErrorCode.INVALID_JSON
    with pytest.raises(RealtimeError) as info:
        parse_client_event('{"type":"session.update","event_id":"e1","session":{"instructions":"\\ud800"}}')
    assert info.value.code == RealtimeErrorCode.INVALID_EVENT and info.value.event_id == "e1"
