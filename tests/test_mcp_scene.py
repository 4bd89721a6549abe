"""mcp_server/scene.py through the SDK's own client on the embedded engine: each NPC hears the other's
previous frame and keeps its own words; a character with itself is named apart. The second test uses
the `traveller` character the first one creates."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("mcp")

from mcp import Client  # noqa: E402

from mcp_server import build_server  # noqa: E402
from npc_voice.audio import float_to_pcm16  # noqa: E402
from mcp_helpers import RATE, ROLE, b64, decode_wav, error_text, run, tone, wav  # noqa: E402
from mcp_helpers import model, folders, backend, ferryman  # noqa: E402,F401 (fixtures)


def test_scene(backend, ferryman, monkeypatch) -> None:
    # What the engine's step received per slot (the audio each NPC heard), and every frame event.
    engine = backend.engine()
    heard: list[dict[str, np.ndarray]] = []  # per tick: {persona role: the input frame of its slot}
    said: dict[str, list] = {}  # persona role -> its FrameEvents
    roles: dict[str, str] = {}  # session id -> persona role
    step, tick = engine.step, engine.tick

    def spy_step(pcm, active, *args):
        heard.append({s.persona.role: pcm[s.slot].copy() for s in engine.sessions if active[s.slot]})
        return step(pcm, active, *args)

    def spy_tick():
        events = tick()
        roles.update({s.id: s.persona.role for s in engine.sessions})
        for ev in events:
            said.setdefault(roles[ev.session_id], []).append(ev)
        return events

    monkeypatch.setattr(engine, "step", spy_step)
    monkeypatch.setattr(engine, "tick", spy_tick)
    poet = "You are a lost poet. Your name is Dante."

    async def go():
        async with Client(build_server(backend)) as client:
            # a second character with another voice
            created = await client.call_tool("create_character", {
                "id": "traveller", "name": "Dante", "role": poet,
                "voice_base64": b64(wav(tone(2.5, 260.0, seed=5)))})
            assert not created.is_error
            result = await client.call_tool("run_scene", {"character_a": ferryman, "character_b": "traveller",
                                                          "seconds": 1.2, "seed": 1})
            assert not result.is_error, result.content[0].text
            summary = result.structured_content
            assert summary["kind"] == "scene" and summary["characters"] == [ferryman, "traveller"]
            assert summary["seconds"] == pytest.approx(1.2) and "stereo" in summary["audio"]
            assert "left = ferryman" in summary["audio"]
            samples, rate = decode_wav([c for c in result.content if c.type == "audio"][0])
            assert rate == RATE and samples.shape == (15 * 1920, 2)
            assert not np.array_equal(samples[:, 0], samples[:, 1])

            # each NPC heard the other's previous frame (silence at the first step), and the WAV's
            # channels are what A and B said (as 16-bit PCM)
            a, b = said[ROLE], said[poet]
            assert [ev.frame for ev in a] == [ev.frame for ev in b] == list(range(15)) and len(heard) == 15
            silence = np.zeros(1920, np.float32)
            for t, inputs in enumerate(heard):
                assert np.array_equal(inputs[poet], a[t - 1].pcm if t else silence), t
                assert np.array_equal(inputs[ROLE], b[t - 1].pcm if t else silence), t
            for channel, events in ((0, a), (1, b)):
                pcm16 = float_to_pcm16(np.concatenate([ev.pcm for ev in events]))
                assert np.array_equal(samples[:, channel], pcm16 / np.float32(32768)), channel

            # each side's words are its own text stream (the streams differ, so a swap or a mix fails)
            def own_text(events) -> str:
                return "".join(ev.text for ev in events).replace(" ", "")

            def words_of(speaker: str) -> str:
                return "".join(w["word"] for w in summary["words"] if w["speaker"] == speaker)

            assert own_text(a) and own_text(b) and own_text(a) != own_text(b)
            assert words_of(ferryman) == own_text(a) and words_of("traveller") == own_text(b)
            starts = [w["start"] for w in summary["words"]]
            assert starts == sorted(starts) and {w["speaker"] for w in summary["words"]} == {ferryman, "traveller"}
            resource = json.loads((await client.read_resource(f"transcript://{summary['session']}")).contents[0].text)
            assert resource["words"] == summary["words"]
            assert "unknown character" in error_text(await client.call_tool(
                "run_scene", {"character_a": ferryman, "character_b": "ghost", "seconds": 1}))
            assert "at most" in error_text(await client.call_tool(
                "run_scene", {"character_a": ferryman, "character_b": "traveller", "seconds": 10_000}))

    run(go())
    assert backend.engine().sessions == []


def test_scene_of_a_character_with_itself(backend, ferryman) -> None:
    """Its two sides are named apart in the words, the text and the audio description."""

    async def go():
        async with Client(build_server(backend)) as client:
            result = await client.call_tool("run_scene", {"character_a": ferryman, "character_b": ferryman,
                                                          "seconds": 1.2, "seed": 1})
            assert not result.is_error, result.content[0].text
            summary = result.structured_content
            sides = [f"{ferryman} (A)", f"{ferryman} (B)"]
            assert summary["characters"] == [ferryman, ferryman] and summary["speakers"] == sides
            assert {w["speaker"] for w in summary["words"]} == set(sides) and set(summary["text"]) == set(sides)
            assert summary["text"][sides[0]] != summary["text"][sides[1]]
            assert f"left = {sides[0]}, right = {sides[1]}" in summary["audio"]
            resource = json.loads((await client.read_resource(f"transcript://{summary['session']}")).contents[0].text)
            assert resource["speakers"] == sides and resource["words"] == summary["words"]
            # two characters keep their ids
            other = (await client.call_tool("run_scene", {"character_a": ferryman, "character_b": "traveller",
                                                          "seconds": 0.4})).structured_content
            assert other["speakers"] == [ferryman, "traveller"]

    run(go())
