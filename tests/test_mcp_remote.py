"""mcp_server/remote.py through the SDK's own client, against a real `npc-voice serve` child process
on 127.0.0.1 (tiny model): a scene relays each NPC's frames to the other (cross-feed) and names the
two sides of a character with itself apart; `say` reads as words; concurrent talks overlap. First,
the MCP tools against a `BackgroundServer` in this process (with and without the characters folder,
every slot taken, unreachable). Fixtures are tests/mcp_helpers.py's (the tiny model, generated voices,
the `ferryman` character)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile

pytest.importorskip("mcp")

from mcp import Client  # noqa: E402

from conftest import serve_child  # noqa: E402
from mcp_server import Backend, Settings, build_server  # noqa: E402
from npc_voice.audio import float_to_pcm16, pcm16_to_float  # noqa: E402
from mcp_helpers import RATE, b64, decode_wav, error_text, run, talks_side_by_side, tone, wav  # noqa: E402
from mcp_helpers import model, folders, backend, ferryman  # noqa: E402,F401 (fixtures)

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


def test_remote_server(model, folders, ferryman) -> None:
    from npc_voice.client import NPCVoiceClient
    from npc_voice.engine import Engine
    from npc_voice.serve import BackgroundServer, ServerConfig
    from npc_voice.characters import open_store

    token = "remote-token-0123456789"
    engine = Engine(model, slots=2)
    with BackgroundServer(engine, ServerConfig(port=0, token=token), open_store(folders["characters"])) as bg:
        backend = Backend(Settings(characters=folders["characters"], server_url=bg.url.removesuffix("/ws"),
                                   token=token), model=model)

        async def go():
            async with Client(build_server(backend)) as client:
                status = (await client.call_tool("server_status", {})).structured_content
                assert status["mode"] == "remote" and status["server"]["status"] == "ok"
                result = await client.call_tool("talk_to_character", {"character": ferryman,
                                                                      "audio_base64": b64(wav(tone(1.0)))})
                assert not result.is_error, result.content[0].text
                samples, _ = decode_wav([c for c in result.content if c.type == "audio"][0])
                assert samples.shape == (RATE, 1) and result.structured_content["status"] == "finished"
                info = (await client.call_tool("start_player_session", {"character": ferryman})).structured_content
                assert info["websocket_url"] == bg.url and info["token"] == token and not info["embedded"]
                assert "unknown character" in error_text(await client.call_tool(
                    "talk_to_character", {"character": "ghost", "audio_base64": b64(wav(tone(1.0)))}))
                scene = await client.call_tool("run_scene", {"character_a": ferryman, "character_b": ferryman,
                                                             "seconds": 1.0})
                assert not scene.is_error, scene.content[0].text
                samples, _ = decode_wav([c for c in scene.content if c.type == "audio"][0])
                assert samples.shape == (13 * 1920, 2)  # ceil(1.0 s / 80 ms) frames
                assert scene.structured_content["status"] == "finished"
                sides = [f"{ferryman} (A)", f"{ferryman} (B)"]  # a character with itself, named apart
                assert scene.structured_content["speakers"] == sides
                assert {w["speaker"] for w in scene.structured_content["words"]} <= set(sides)
                said = await client.call_tool("say", {"character": ferryman, "text": "A coin.", "audio_output": "none"})
                assert not said.is_error, said.content[0].text
                assert said.structured_content["kind"] == "say" and said.structured_content["status"] == "finished"
                assert "Acoin." in "".join(w["word"] for w in said.structured_content["words"])
                # every slot taken by games: server busy
                async with NPCVoiceClient(bg.url, token) as g1, NPCVoiceClient(bg.url, token) as g2:
                    await g1.start(character=ferryman)
                    await g2.start(character=ferryman)
                    busy = await client.call_tool("talk_to_character", {"character": ferryman,
                                                                        "audio_base64": b64(wav(tone(1.0)))})
                    assert "server busy" in error_text(busy)

        run(go())

    # a server without this MCP server's characters folder: the character is sent inline
    with BackgroundServer(Engine(model, slots=1), ServerConfig(port=0), None) as bare:
        inline = Backend(Settings(characters=folders["characters"], server_url=bare.url), model=model)

        async def go_inline():
            async with Client(build_server(inline)) as client:
                result = await client.call_tool("talk_to_character", {"character": ferryman,
                                                                      "audio_base64": b64(wav(tone(0.5)))})
                assert not result.is_error, result.content[0].text

        run(go_inline())

    wrong = Backend(Settings(characters=folders["characters"], server_url="ws://127.0.0.1:9", token="x"), model=model)

    async def unreachable():
        async with Client(build_server(wrong)) as client:
            result = await client.call_tool("talk_to_character", {"character": ferryman,
                                                                  "audio_base64": b64(wav(tone(1.0)))})
            assert "cannot reach the npc-voice server" in error_text(result)

    run(unreachable())


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
    talks_side_by_side(remote, ferryman, 2.0)
