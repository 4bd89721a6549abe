"""mcp_server/remote.py through the SDK's own client, against a real `npc-voice serve` child process
on 127.0.0.1 (tiny model): a scene relays each NPC's frames to the other (cross-feed) and names the
two sides of a character with itself apart; `say` reads as words; concurrent talks overlap.
Fixtures are test_mcp.py's (the tiny model, generated voices, the `ferryman` character)."""

from __future__ import annotations

import io

import anyio
import numpy as np
import pytest
import soundfile

pytest.importorskip("mcp")

from mcp import Client  # noqa: E402

from conftest import serve_child  # noqa: E402
from mcp_server import Backend, Settings, build_server  # noqa: E402
from npc_voice.audio import float_to_pcm16, pcm16_to_float  # noqa: E402
from test_mcp import b64, backend, ferryman, folders, model, run, tone, wav  # noqa: E402,F401

FRAME = 1920


@pytest.fixture(scope="module")
def remote(folders, ferryman):
    """An MCP backend in remote mode over a real `npc-voice serve` sharing its characters folder."""
    with serve_child("--characters", str(folders["characters"]), "--slots", "4", "--threads", "1",
                     "--device", "cpu") as (port, health):
        assert health()["status"] == "ok"
        backend = Backend(Settings(characters=folders["characters"], server_url=f"ws://127.0.0.1:{port}"))
        yield backend
        backend.close()


def wav_int16(content) -> np.ndarray:
    import base64

    data, _ = soundfile.read(io.BytesIO(base64.b64decode(content.data)), dtype="int16", always_2d=True)
    return data


def test_remote_scene_cross_feeds_and_names_the_sides_apart(remote, ferryman, monkeypatch) -> None:
    from npc_voice.client import ClientSession, NPCVoiceClient

    started: list[str] = []  # session ids in the order they were started: A, then B
    sent: dict[str, list[np.ndarray]] = {}  # session id -> the audio the MCP server sent it
    real_start, real_send = NPCVoiceClient.start, ClientSession.send_audio

    async def start(self, *args, **kwargs):
        session = await real_start(self, *args, **kwargs)
        started.append(session.id)
        return session

    async def send_audio(self, pcm):
        assert isinstance(pcm, np.ndarray) and pcm.dtype == np.int16  # relayed as received: no conversion
        sent.setdefault(self.id, []).append(pcm.copy())
        await real_send(self, pcm)

    monkeypatch.setattr(NPCVoiceClient, "start", start)
    monkeypatch.setattr(ClientSession, "send_audio", send_audio)
    frames = 20

    async def go():
        async with Client(build_server(remote)) as client:
            result = await client.call_tool("run_scene", {"character_a": ferryman, "character_b": ferryman,
                                                          "seconds": frames * 0.08, "seed": 3})
            assert not result.is_error, result.content[0].text
            return result

    result = run(go())
    summary = result.structured_content
    assert summary["status"] == "finished" and summary["seconds"] == pytest.approx(frames * 0.08)
    sides = [f"{ferryman} (A)", f"{ferryman} (B)"]
    assert summary["characters"] == [ferryman, ferryman] and summary["speakers"] == sides
    # (the tiny model's random text stream says something on both sides within a second or two)
    assert {w["speaker"] for w in summary["words"]} == set(sides) and set(summary["text"]) == set(sides)
    assert summary["text"][sides[0]] != summary["text"][sides[1]]
    assert f"left = {sides[0]}, right = {sides[1]}" in summary["audio"]
    stereo = wav_int16([c for c in result.content if c.type == "audio"][0])
    assert stereo.shape == (frames * FRAME, 2) and not np.array_equal(stereo[:, 0], stereo[:, 1])

    # cross-feed: what each NPC was sent is, frame by frame, what the other said (the WAV's channel
    # holds the same frames, written as float: int16 / 32768 -> trunc(x * 32767))
    assert len(started) == 2
    for heard_by, speaker_channel in ((started[1], 0), (started[0], 1)):
        relayed = np.concatenate(sent[heard_by])
        n = relayed.shape[0] // FRAME
        assert relayed.shape[0] == n * FRAME and n >= frames - 2, n
        expected = float_to_pcm16(pcm16_to_float(relayed))
        assert np.array_equal(stereo[: n * FRAME, speaker_channel], expected), speaker_channel


def test_remote_say_reads_as_words(remote, ferryman) -> None:
    async def go():
        async with Client(build_server(remote)) as client:
            said = await client.call_tool("say", {"character": ferryman, "text": "Pay the ferryman.",
                                                  "audio_output": "none"})
            assert not said.is_error, said.content[0].text
            assert said.structured_content["kind"] == "say" and said.structured_content["status"] == "finished"
            assert "Pay the ferryman." in said.structured_content["text"][ferryman], said.structured_content["words"]

    run(go())


def test_remote_talks_run_side_by_side(remote, ferryman) -> None:
    progress: dict[str, list[float]] = {"a": [], "b": []}
    results = {}

    async def go():
        async with Client(build_server(remote)) as client:
            async def talk(name: str, seed: int) -> None:
                async def on_progress(done, total, message):
                    if done > 0:
                        progress[name].append(anyio.current_time())

                results[name] = await client.call_tool(
                    "talk_to_character", {"character": ferryman, "audio_base64": b64(wav(tone(2.0, seed=seed))),
                                          "seed": seed, "audio_output": "none"}, progress_callback=on_progress)

            async with anyio.create_task_group() as tg:
                tg.start_soon(talk, "a", 1)
                tg.start_soon(talk, "b", 2)

    run(go())
    for name in "ab":
        assert not results[name].is_error, results[name].content[0].text
        assert results[name].structured_content["status"] == "finished"
        assert results[name].structured_content["seconds"] == pytest.approx(2.0)
    a, b = progress["a"], progress["b"]
    assert a[0] < b[-1] and b[0] < a[-1]  # their runs overlap in time
