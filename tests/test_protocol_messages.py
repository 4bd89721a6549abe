"""The protocol's messages without sockets: parsing client frames with their error codes, strict
types, hostile JSON, encoding server messages, the speaking/listening rule, the rate conversion
(npc_voice/protocol/: messages.py, parse.py, speech.py, rates.py; docs/protocol.md). Moved from
tests/test_server.py with the modules they test."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from npc_voice.protocol import (
    AUDIO_HEADER, DEFAULT_LIMITS, Dropped, Ended, ErrorCode, ErrorMsg, InlineCharacter, Limits, ProtocolError, Say, SpeechState,
    Start, State, Started, Switched, Text, decode_audio_frame, encode_audio_frame, frame_samples, parse_client_audio,
    parse_client_text, parse_server_text,
)
from npc_voice.protocol.rates import InputConverter, OutputFramer

RATE = 24_000


def tone(seconds: float, freq: float, rate: int = RATE, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * freq * t) * (1 + 0.3 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)


def code_of(data, limits: Limits = DEFAULT_LIMITS) -> str:
    with pytest.raises(ProtocolError) as info:
        if isinstance(data, bytes):
            parse_client_audio(data, limits)
        else:
            parse_client_text(data, limits)
    return info.value.code.value


def test_parse_client_messages() -> None:
    msg = parse_client_text('{"type": "start", "character": "innkeeper", "sample_rate": 16000, "ref": 7}')
    assert isinstance(msg, Start) and msg.character == "innkeeper" and msg.sample_rate == 16000 and msg.ref == 7
    inline = parse_client_text(json.dumps({"type": "start", "character": {"role": "A guard.", "voice": {"preset": "NATF2"}}}))
    assert isinstance(inline.character, InlineCharacter) and inline.character.voice.preset == "NATF2"
    assert isinstance(parse_client_text('{"type": "say", "text": "Halt!"}'), Say)

    assert code_of("{not json") == "bad_json"
    assert code_of("[1, 2]") == "bad_json"
    assert code_of('{"type": "dance"}') == "unknown_type"
    assert code_of('{"character": "x"}') == "invalid_message"
    assert code_of('{"type": "start"}') == "invalid_message"
    assert code_of('{"type": "start", "character": "x", "colour": "red"}') == "invalid_message"
    assert code_of('{"type": "start", "character": "x", "sample_rate": 44100}') == "invalid_message"
    assert code_of('{"type": "start", "character": "x", "protocol": 2}') == "unsupported_version"
    assert code_of('{"type": "start", "character": {"role": "r", "voice": {}}}') == "invalid_message"
    assert code_of('{"type": "say", "text": ""}') == "invalid_message"
    assert code_of(json.dumps({"type": "say", "text": "a" * 1001})) == "invalid_message"
    assert code_of(json.dumps({"type": "start", "character": "x" * 65})) == "unknown_character"
    small = Limits(max_message_bytes=4096, max_text_bytes=1000, max_audio_bytes=2000, max_voice_bytes=100)
    assert code_of(json.dumps({"type": "say", "text": "a" * 990}), small) == "message_too_large"
    big_voice = {"type": "start", "character": {"role": "r", "voice": {"wav_base64": "A" * 400}}}
    assert code_of(json.dumps(big_voice), small) == "voice_too_large"
    # errors keep the request's ref, so a client can match them
    with pytest.raises(ProtocolError) as info:
        parse_client_text('{"type": "start", "character": "x", "protocol": 9, "ref": "r1"}')
    assert info.value.ref == "r1"


def test_fields_have_strict_json_types() -> None:
    """Integers are JSON integers (not "7", 7.0 or true), strings are strings: no coercion on any field
    of any client message (docs/protocol.md: wrong fields are `invalid_message`)."""
    inline = {"role": "A guard.", "name": "Guard", "voice": {"preset": "NATF2"}}
    valid = [
        {"type": "start", "character": "innkeeper", "sample_rate": 48000, "protocol": 1, "seed": 7, "ref": 1},
        {"type": "start", "character": inline | {"voice": {"preset": "NATF2"}}, "seed": 0, "ref": "r"},
        {"type": "start", "character": {"role": "A guard.", "voice": {"wav_base64": "UklGRg=="}, "name": "npc"},
         "seed": 2**31 - 1},
        {"type": "switch", "character": inline, "ref": 2}, {"type": "switch", "character": "smith"},
        {"type": "say", "text": "Halt!", "ref": "x"}, {"type": "end", "ref": -3}, {"type": "end"},
    ]
    for obj in valid:
        dumped = parse_client_text(json.dumps(obj)).model_dump(exclude_none=True)
        assert {k: dumped[k] for k in obj} == obj, obj  # every value as sent, with its JSON type
    wrong = {  # field -> values of the wrong JSON type
        "sample_rate": ["24000", 24000.0, True, None, [24000]], "protocol": ["1", 1.0, True, {"v": 1}],
        "seed": ["7", 7.0, True, False, [7]], "ref": [True, 1.5, [1], {"r": 1}],
    }
    for field, values in wrong.items():
        for value in values:
            if field == "sample_rate" and value is None:
                continue  # an explicit null is the default for optional fields... except sample_rate
            obj = {"type": "start", "character": "innkeeper", field: value}
            assert code_of(json.dumps(obj)) == "invalid_message", obj
    for bad in (7, True, None, ["innkeeper"]):
        assert code_of(json.dumps({"type": "start", "character": bad})) == "invalid_message", bad
        assert code_of(json.dumps({"type": "switch", "character": bad})) == "invalid_message", bad
        assert code_of(json.dumps({"type": "say", "text": bad})) == "invalid_message", bad
        for key in ("role", "name"):
            assert code_of(json.dumps({"type": "start", "character": inline | {key: bad}})) == "invalid_message"
        for key in ("preset", "wav_base64"):
            if bad is not None:
                voice = {key: bad}
                assert code_of(json.dumps({"type": "start", "character": inline | {"voice": voice}})) == \
                    "invalid_message", voice
    for msg in ({"type": "switch", "character": "x", "ref": True}, {"type": "say", "text": "x", "ref": 2.5},
                {"type": "end", "ref": False}):
        assert code_of(json.dumps(msg)) == "invalid_message", msg
    with pytest.raises(ProtocolError) as info:  # the error still carries a well-typed ref
        parse_client_text('{"type": "start", "character": "x", "seed": "7", "ref": "r2"}')
    assert info.value.code.value == "invalid_message" and info.value.ref == "r2" and "seed" in info.value.message


def test_hostile_json_is_refused_with_its_code() -> None:
    """Deep nesting and huge integers get `bad_json` / `invalid_message` (a ProtocolError), never a
    RecursionError or ValueError from the decoder, and quickly."""
    from npc_voice.protocol import MAX_INT_DIGITS, MAX_JSON_DEPTH

    deep = 100_000
    t0 = time.perf_counter()
    assert code_of("[" * deep + "]" * deep) == "bad_json"
    assert code_of('{"type": "say", "text": "x", "extra": ' + '{"a": ' * deep + "1" + "}" * deep + "}") == "bad_json"
    assert code_of('{"type": "end", "ref": ' + "[" * deep) == "bad_json"  # unterminated too
    # the limit itself: MAX_JSON_DEPTH levels parse (and are refused for their fields), one more does not
    nested = lambda n: "[" * (n - 1) + "1" + "]" * (n - 1)  # noqa: E731 - n levels with the outer object
    assert code_of('{"type": "end", "ref": ' + nested(MAX_JSON_DEPTH) + "}") == "invalid_message"
    assert code_of('{"type": "end", "ref": ' + nested(MAX_JSON_DEPTH + 1) + "}") == "bad_json"
    # brackets inside strings are text, not nesting (also after escaped quotes and backslashes)
    text = '[{ \\" ' * 100 + "\\"
    msg = parse_client_text(json.dumps({"type": "say", "text": text[:900], "ref": "[[[[{{{{"}))
    assert isinstance(msg, Say) and msg.text == text[:900] and msg.ref == "[[[[{{{{"
    role = "[laughs] {sighs} " * 300
    msg = parse_client_text(json.dumps({"type": "start", "character": {"role": role, "voice": {"preset": "X"}}}))
    assert msg.character.role == role
    # many escaped quotes after brackets: still linear (a naive string regex is quadratic here)
    assert code_of("[" * 20 + '"' + '\\"' * 500_000) == "bad_json"

    for field in ("seed", "sample_rate", "protocol", "ref"):
        for digits in ("9" * 5000, "-" + "9" * 5000, "1" * (MAX_INT_DIGITS + 1)):
            with pytest.raises(ProtocolError) as info:
                parse_client_text(f'{{"type": "start", "character": "x", "{field}": {digits}, "ref": "r"}}'
                                  if field != "ref" else f'{{"type": "start", "character": "x", "ref": {digits}}}')
            assert info.value.code.value == "invalid_message" and field in info.value.message, info.value.message
            assert "digits" in info.value.message
            assert info.value.ref == ("r" if field != "ref" else None)
    assert code_of('{"type": "say", "text": ' + "7" * 5000 + "}") == "invalid_message"
    assert code_of('{"type": "start", "character": "x", "seed": 1e99999}') == "invalid_message"  # inf
    for constant in ("NaN", "Infinity", "-Infinity"):  # Python's decoder reads them; JSON has no such values
        assert code_of(f'{{"type": "start", "character": "x", "seed": {constant}}}') == "bad_json"
    for blank in ("", "   ", "\\n\\t "):  # a line of nothing to say
        assert code_of(f'{{"type": "say", "text": "{blank}"}}') == "invalid_message"
    big_ref = int("9" * MAX_INT_DIGITS)
    assert parse_client_text(f'{{"type": "end", "ref": {big_ref}}}').ref == big_ref  # the longest integer allowed
    assert parse_client_text(f'{{"type": "end", "ref": -{big_ref}}}').ref == -big_ref  # the sign is no digit
    # strings are Unicode: a lone surrogate escape is refused, and not echoed back as a ref
    with pytest.raises(ProtocolError) as info:
        parse_client_text('{"type": "say", "text": "a\\ud800b", "ref": "\\udc00"}')
    assert info.value.code.value == "invalid_message" and info.value.ref is None
    assert time.perf_counter() - t0 < 5.0, "hostile JSON took too long"


def test_inline_character_values_are_invalid_character() -> None:
    """docs/protocol.md: a character that cannot be used (an empty or too long role, a bad preset
    name, ...) is `invalid_character`; only the message's shape (types, missing or unknown fields,
    not exactly one voice) is `invalid_message`."""
    def inline(**change):
        character = {"role": "A guard.", "name": "Guard", "voice": {"preset": "NATF2"}} | change
        return [json.dumps({"type": kind, "character": character}) for kind in ("start", "switch")]

    for texts, code in (
        (inline(role=""), "invalid_character"), (inline(role="  \n "), "invalid_character"),
        (inline(role="x" * (DEFAULT_LIMITS.max_role_chars + 1)), "invalid_character"),
        (inline(name=""), "invalid_character"), (inline(name=" "), "invalid_character"),
        (inline(name="n" * (DEFAULT_LIMITS.max_name_chars + 1)), "invalid_character"),
        (inline(voice={"preset": ""}), "invalid_character"), (inline(voice={"preset": "P" * 65}), "invalid_character"),
        (inline(role=None), "invalid_message"), (inline(role=["x"]), "invalid_message"),
        (inline(voice={}), "invalid_message"), (inline(voice={"preset": "A", "wav_base64": "AAAA"}), "invalid_message"),
        (inline(voice={"preset": "A", "pitch": 2}), "invalid_message"), (inline(mood="grim"), "invalid_message"),
    ):
        for text in texts:
            assert code_of(text) == code, text
    with pytest.raises(ProtocolError) as info:  # the reply names the problem and keeps the ref
        parse_client_text(json.dumps({"type": "start", "character": {"role": "", "voice": {"preset": "A"}}, "ref": 4}))
    assert "role is empty" in info.value.message and info.value.ref == 4


def test_audio_messages() -> None:
    pcm = np.array([0, 1, -1, 32767, -32768], dtype=np.int16)
    assert np.array_equal(parse_client_audio(pcm.tobytes()), pcm)
    assert code_of(b"\x00\x01\x02") == "bad_audio"
    assert code_of(b"\x00" * (DEFAULT_LIMITS.max_audio_bytes + 2)) == "message_too_large"
    data = encode_audio_frame(123456, pcm)
    assert len(data) == AUDIO_HEADER.size + 2 * pcm.size and data[:4] == (123456).to_bytes(4, "little")
    frame, back = decode_audio_frame(data)
    assert frame == 123456 and np.array_equal(back, pcm)
    assert [frame_samples(r) for r in (16_000, 24_000, 48_000)] == [1280, 1920, 3840]


def test_server_messages_round_trip() -> None:
    for msg in (Started(session="s1", character="innkeeper", sample_rate=16000, frame_samples=1280, ref=3),
                Text(frame=12, time=0.96, text=" hello"), State(state="speaking", frame=4, time=0.32),
                Switched(character="blacksmith", frame=40), ErrorMsg(code="bad_json", message="x"),
                Dropped(output_frames=3, input_frames=0, total_output_frames=5, total_input_frames=0),
                Ended(session="s1", reason="client", frames=10, dropped_output_frames=0, dropped_input_frames=0)):
        text = msg.encode()
        assert json.loads(text)["type"] == msg.TYPE
        assert parse_server_text(text) == msg


def test_speech_state_rule() -> None:
    state = SpeechState(threshold_dbfs=-40.0, hangover=3)
    quiet, loud = np.zeros(1920, np.float32), np.full(1920, 0.05, np.float32)
    changes = [state.update(i, text, pcm) for i, (text, pcm) in enumerate([
        ("", quiet), ("", quiet), (" hi", quiet), ("", loud), ("", quiet), ("", quiet), ("", quiet), ("", quiet),
        ("", loud)])]
    assert changes == [None, None, ("speaking", 2), None, None, None, ("listening", 4), None, ("speaking", 8)]


@pytest.mark.parametrize("rate", [16_000, 48_000])
def test_rate_conversion_keeps_exact_frames(rate: int) -> None:
    framer = OutputFramer(rate)
    frames = [framer(tone(0.08, 440, RATE)[:1920]) for _ in range(50)]
    assert all(f.shape == (frame_samples(rate),) and f.dtype == np.int16 for f in frames)
    assert framer.underruns == 0
    out = np.concatenate(frames[5:]).astype(np.float32) / 32768
    spectrum = np.abs(np.fft.rfft(out))
    assert abs(np.argmax(spectrum) * rate / out.size - 440) < 10  # still a 440 Hz tone


@pytest.mark.parametrize("rate", [16_000, 48_000])
def test_input_conversion_keeps_every_sample_in_place(rate: int) -> None:
    """Client audio in odd 37 ms chunks, then the stream flushed: exactly the input's duration at 24 kHz
    (a lost chunk is 888 samples) and no lag against resampling the whole clip at once."""
    import soxr

    chunk, chunks = int(0.037 * rate), 100
    x = (np.random.default_rng(0).standard_normal(chunk * chunks) * 0.2 * 32767).astype(np.int16)
    conv = InputConverter(rate)
    out = [conv(x[i * chunk:(i + 1) * chunk]) for i in range(chunks)]
    out.append(conv._stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True))  # flush the filter
    got = np.concatenate(out)
    assert abs(got.shape[0] - chunk * chunks * RATE / rate) <= 2
    whole = soxr.resample(x.astype(np.float32) / 32768, rate, RATE, quality="HQ")
    n = min(got.shape[0], whole.shape[0], 12_000)
    lag = int(np.argmax(np.correlate(got[:n], whole[:n], "full"))) - (n - 1)
    assert abs(lag) <= 2, lag
    np.testing.assert_allclose(got[:n], whole[:n], atol=1e-5)  # the same samples, not merely the same count


def test_server_messages_ignore_unknown_fields() -> None:
    msg = parse_server_text('{"type":"text","frame":1,"time":0.08,"text":" a","speaker":"npc"}')
    assert msg.text == " a"


@pytest.mark.parametrize("text", [
    '{"type":"start","character":{"role":"You are \\ud800 x","name":"X","voice":{"preset":"NATF0"}}}',
    '{"type":"start","character":{"role":"You sell fish.","name":"\\udc00","voice":{"preset":"NATF0"}}}',
    '{"type":"start","character":"\\ud800"}',
    '{"type":"switch","character":{"role":"You \\ud800","name":"X","voice":{"preset":"NATF0"}},"ref":"sw"}',
])
def test_a_lone_surrogate_anywhere_is_invalid_message(text: str) -> None:
    """docs/protocol.md: strings must be valid Unicode; "\\ud800" is invalid_message (it reached
    the tokenizer before, an internal_error)."""
    with pytest.raises(ProtocolError) as info:
        parse_client_text(text)
    assert info.value.code == ErrorCode.INVALID_MESSAGE and "not valid Unicode" in info.value.message
