"""The MCP server's embedded mode runs on ONE engine: player sessions, talks and scenes share it
(one KV cache), one thread steps it, and concurrent talks run side by side in free slots."""

from __future__ import annotations

import anyio
import pytest

pytest.importorskip("mcp")

from mcp import Client  # noqa: E402

from mcp_server import Backend, Settings, build_server  # noqa: E402
from npc_voice.model.loading import random_model  # noqa: E402
from conftest import read_audio_frames  # noqa: E402
from mcp_helpers import ROLE, b64, run, talks_side_by_side, tone, wav  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return random_model("tiny")


@pytest.fixture()
def backend(model, tmp_path):
    backend = Backend(Settings(characters=tmp_path / "characters", slots=4), model=model)

    async def create():
        async with Client(build_server(backend)) as client:
            result = await client.call_tool("create_character", {
                "id": "ferryman", "name": "Charon", "role": ROLE, "voice_base64": b64(wav(tone(2.5, 150.0)))})
            assert not result.is_error, result.content[0].text

    run(create())
    yield backend
    backend.close()


def test_one_engine_for_players_talks_and_scenes(backend, monkeypatch) -> None:
    import npc_voice.engine as engine_module
    from npc_voice.client import NPCVoiceClient

    made = []
    real = engine_module.Engine

    class Counted(real):  # type: ignore[misc,valid-type]
        def __init__(self, *args, **kwargs):
            made.append(self)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(engine_module, "Engine", Counted)

    async def go():
        async with Client(build_server(backend)) as client:
            offline = await client.call_tool("talk_to_character", {"character": "ferryman",
                                                                   "audio_base64": b64(wav(tone(0.5)))})
            assert not offline.is_error, offline.content[0].text
            info = (await client.call_tool("start_player_session", {"character": "ferryman"})).structured_content
            status = (await client.call_tool("server_status", {})).structured_content
            assert "real-time" in status["engine"]["ticked_by"] and status["engine"]["slots"] == 4
            async with NPCVoiceClient(info["websocket_url"], info["token"]) as game:
                session = await game.start(character="ferryman", seed=1)
                await session.send_audio(tone(1.0))
                # a talk and a scene while a player is live: the same engine, stepped by the player
                # server's real-time loop (so they take real time)
                started = anyio.current_time()
                talk = await client.call_tool("talk_to_character", {"character": "ferryman",
                                                                    "audio_base64": b64(wav(tone(0.8)))})
                assert not talk.is_error, talk.content[0].text
                assert talk.structured_content["status"] == "finished"
                assert talk.structured_content["seconds"] == pytest.approx(0.8)
                assert anyio.current_time() - started >= 0.6  # 10 frames of 80 ms, paced
                scene = await client.call_tool("run_scene", {"character_a": "ferryman", "character_b": "ferryman",
                                                             "seconds": 0.4, "audio_output": "none"})
                assert not scene.is_error and scene.structured_content["seconds"] == pytest.approx(0.4)
                assert await read_audio_frames(session, 3) == 3
                await session.end()
            assert backend._player.server.engine is backend.engine()
            ended = await client.call_tool("end_session", {"session": info["session"]})
            assert "stopped" in ended.structured_content["message"]
            # the player server gone: offline ticking again, on the same engine
            again = await client.call_tool("talk_to_character", {"character": "ferryman",
                                                                 "audio_base64": b64(wav(tone(0.5)))})
            assert not again.is_error and again.structured_content["status"] == "finished"
            status = (await client.call_tool("server_status", {})).structured_content
            assert "offline" in status["engine"]["ticked_by"]

    run(go())
    assert len(made) == 1 and made[0] is backend.engine()
    assert backend.engine().sessions == []


def test_concurrent_talks_progress_together(backend, monkeypatch) -> None:
    engine = backend.engine()
    live: list[int] = []
    tick = engine.tick

    def spy_tick():
        events = tick()
        live.append(len(events))
        return events

    monkeypatch.setattr(engine, "tick", spy_tick)
    talks_side_by_side(backend, "ferryman", 4.0)
    # both were in the engine at once (one tick stepped both)
    assert max(live) == 2
    assert backend.engine().sessions == []
