"""mcp_server/talk.py through the SDK's own client, on the embedded engine: `say`'s transcript reads
as the line's words (its tokens come 3 frames apart and are not split apart), and a talk and a
`say` run side by side in free slots. Fixtures are test_mcp.py's (the tiny model, generated voices)."""

from __future__ import annotations

import anyio
import pytest

pytest.importorskip("mcp")

from mcp import Client  # noqa: E402

from mcp_server import build_server  # noqa: E402
from test_mcp import b64, backend, ferryman, folders, model, run, tone, wav  # noqa: E402,F401


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
