"""mcp_server/talk.py through the SDK's own client, on the embedded engine: `talk_to_character` (its
reply, transcript and progress) and its errors, `say` (a given line or a scripted one); `say`'s
transcript reads as the line's words (its tokens come 3 frames apart and are not split apart), and a
talk and a `say` run side by side in free slots. Fixtures are tests/mcp_helpers.py's (the tiny model,
generated voices, the `ferryman` character)."""

from __future__ import annotations

import json

import anyio
import numpy as np
import pytest

pytest.importorskip("mcp")

from mcp import Client, MCPError  # noqa: E402

from mcp_server import build_server  # noqa: E402
from mcp_helpers import RATE, RESOURCE_NOT_FOUND, b64, decode_wav, error_text, run, tone, wav  # noqa: E402
from mcp_helpers import model, folders, backend, ferryman  # noqa: E402,F401 (fixtures)


def test_say_transcript_reads_as_words(backend, ferryman) -> None:
    async def go():
        async with Client(build_server(backend)) as client:
            result = await client.call_tool("say", {"character": ferryman, "text": "Pay the ferryman.", "seed": 5,
                                                    "audio_output": "none"})
            assert not result.is_error, result.content[0].text
            summary = result.structured_content
            words = [w["word"] for w in summary["words"]]
            # " P", "ay", " the", " fe", "rry", "m", "an", ".": one token every 3 frames, three words
            # (the model's own first frame may come before the line)
            assert "Pay" in words, summary["words"]
            i = words.index("Pay")
            assert words[i:i + 2] == ["Pay", "the"] and words[i + 2].startswith("ferryman."), summary["words"]
            assert "Pay the ferryman." in summary["text"][ferryman]
            pay, ferry = summary["words"][i], summary["words"][i + 2]
            assert ferry["start"] - pay["start"] == pytest.approx(9 * 0.08)  # " fe" is the 4th token
            assert ferry["end"] - ferry["start"] >= 13 * 0.08  # "fe" ... "." is one word
            greeting = await client.call_tool("say", {"character": ferryman, "line": "greeting", "seconds": 2.4,
                                                      "audio_output": "none"})
            assert "A coin, traveller." in greeting.structured_content["text"][ferryman]

    run(go())


def test_a_talk_and_a_say_side_by_side(backend, ferryman) -> None:
    """Two conversations at once take two free slots of the one engine: both finish, and each made
    progress while the other ran (neither queued behind the other)."""
    progress: dict[str, list[tuple[float, float]]] = {"talk": [], "say": []}
    results = {}

    async def go():
        async with Client(build_server(backend)) as client:
            async def call(name: str, tool: str, args: dict) -> None:
                async def on_progress(done, total, message):
                    if done > 0:
                        progress[name].append((anyio.current_time(), done))

                results[name] = await client.call_tool(tool, {"character": ferryman, "audio_output": "none"} | args,
                                                       progress_callback=on_progress)

            async with anyio.create_task_group() as tg:
                tg.start_soon(call, "talk", "talk_to_character", {"audio_base64": b64(wav(tone(4.0, seed=7)))})
                tg.start_soon(call, "say", "say", {"text": "A coin for the crossing, traveller.", "seconds": 4.0})

    run(go())
    for name in results:
        assert not results[name].is_error, results[name].content[0].text
        assert results[name].structured_content["status"] == "finished"
        assert results[name].structured_content["seconds"] == pytest.approx(4.0)
    talk, say = progress["talk"], progress["say"]
    assert talk[0][0] < say[-1][0] and say[0][0] < talk[-1][0]  # their runs overlap in time
    assert backend.engine().sessions == []


def test_talk_to_character(backend, ferryman) -> None:
    clip = tone(1.5, 300.0, seed=3)
    progress: list[tuple[float, float | None]] = []

    async def on_progress(done, total, message):
        progress.append((done, total))

    async def go():
        async with Client(build_server(backend)) as client:
            result = await client.call_tool("talk_to_character", {"character": ferryman, "audio_base64": b64(wav(clip)),
                                                                  "seed": 3}, progress_callback=on_progress)
            assert not result.is_error, result.content[0].text
            summary = result.structured_content
            assert summary["kind"] == "talk" and summary["status"] == "finished" and summary["characters"] == [ferryman]
            assert abs(summary["seconds"] - 1.52) < 0.01  # 19 frames of 80 ms
            audio = [c for c in result.content if c.type == "audio"]
            assert len(audio) == 1
            samples, rate = decode_wav(audio[0])
            assert rate == RATE and samples.shape == (clip.shape[0], 1)
            session = summary["session"]
            resource = json.loads((await client.read_resource(f"transcript://{session}")).contents[0].text)
            assert resource["session"] == session and resource["words"] == summary["words"]
            for w in resource["words"]:
                assert w["speaker"] == ferryman and 0 <= w["start"] <= w["end"] <= 1.6
            assert (await client.call_tool("get_transcript", {"session": session})).structured_content == resource
            # the same file from the allowed folder
            again = await client.call_tool("talk_to_character", {"character": ferryman, "audio_file": "hello.wav"})
            assert not again.is_error and again.structured_content["seconds"] == pytest.approx(1.04)
            ended = await client.call_tool("end_session", {"session": session})
            assert ended.structured_content["status"] == "finished"

    run(go())
    assert progress and progress[-1] == (19, 19) and all(t == 19 for _, t in progress)
    assert backend.engine().sessions == []


def test_talk_errors(backend, ferryman) -> None:
    async def go():
        async with Client(build_server(backend)) as client:
            async def talk(**args):
                return await client.call_tool("talk_to_character", {"character": ferryman} | args)

            assert "unknown character 'ghost'" in error_text(await client.call_tool(
                "talk_to_character", {"character": "ghost", "audio_base64": b64(wav(tone(1.0)))}))
            assert "unreadable audio" in error_text(await talk(audio_base64=b64(b"\x00\x01garbage" * 50)))
            assert "not valid base64" in error_text(await talk(audio_base64="not base64!"))
            assert "exactly one of" in error_text(await talk())
            assert "outside the allowed audio folder" in error_text(await talk(audio_file="../outside/secret.wav"))
            assert "outside the allowed audio folder" in error_text(await talk(audio_file="escape.wav"))
            assert "unknown session" in error_text(await client.call_tool("get_transcript", {"session": "talk-999"}))
            assert "unknown session" in error_text(await client.call_tool("end_session", {"session": "nope"}))
            with pytest.raises(MCPError, match="unknown session 'talk-999'") as err:  # resource not found
                await client.read_resource("transcript://talk-999")
            assert err.value.error.code == RESOURCE_NOT_FOUND
            # server busy: another conversation holds the engine for longer than busy_wait_s (0.5 s here)
            lock = backend.engine_lock()
            lock.acquire()
            try:
                assert "server busy" in error_text(await talk(audio_base64=b64(wav(tone(1.0)))))
            finally:
                lock.release()

    run(go())


def test_say(backend, ferryman) -> None:
    """The NPC speaks a given line: the line is in its text stream, its voice comes back."""
    tokenizer = backend.model().tokenizer

    async def go():
        async with Client(build_server(backend)) as client:
            line = "Pay the ferryman."
            result = await client.call_tool("say", {"character": ferryman, "text": line, "seed": 5})
            assert not result.is_error, result.content[0].text
            summary = result.structured_content
            assert summary["kind"] == "say" and summary["status"] == "finished" and summary["characters"] == [ferryman]
            frames = len(tokenizer.encode(" " + line)) * 3 + 13  # a token every 3 frames, then about a second
            assert summary["seconds"] == pytest.approx(frames * 0.08)
            said = "".join(w["word"] for w in summary["words"])
            assert "Paytheferryman." in said
            samples, rate = decode_wav([c for c in result.content if c.type == "audio"][0])
            assert rate == RATE and samples.shape == (frames * 1920, 1) and np.abs(samples).max() > 0

            # a scripted line of the character, for a given time, transcript only
            greeting = await client.call_tool("say", {"character": ferryman, "line": "greeting", "seconds": 2.4,
                                                      "audio_output": "none"})
            assert not greeting.is_error, greeting.content[0].text
            assert greeting.structured_content["seconds"] == pytest.approx(2.4)
            assert "Acoin," in "".join(w["word"] for w in greeting.structured_content["words"])
            assert [c.type for c in greeting.content] == ["text"]
            # without the line, the same seed says something else: the line comes from `say`, not chance
            plain = await client.call_tool("talk_to_character", {"character": ferryman, "seed": 5,
                                                                 "audio_base64": b64(wav(np.zeros(frames * 1920)))})
            assert "Paytheferryman." not in "".join(w["word"] for w in plain.structured_content["words"])

            assert "exactly one of text" in error_text(await client.call_tool("say", {"character": ferryman}))
            assert "exactly one of text" in error_text(await client.call_tool(
                "say", {"character": ferryman, "text": "Hi.", "line": "greeting"}))
            text = error_text(await client.call_tool("say", {"character": ferryman, "line": "farewell"}))
            assert "no line 'farewell'" in text and "greeting" in text
            assert "unknown character 'ghost'" in error_text(await client.call_tool(
                "say", {"character": "ghost", "text": "Boo."}))

    run(go())
    assert backend.engine().sessions == []
