"""mcp_server/backend.py: cancelled calls and end_session free the engine, the embedded player
server, and the character checks held to the model's context."""

from __future__ import annotations


import anyio
import pytest

pytest.importorskip("mcp")

from mcp import Client  # noqa: E402

from mcp_server import Backend, Settings, build_server  # noqa: E402
from npc_voice.model.loading import random_model  # noqa: E402
from conftest import read_audio_frames  # noqa: E402
from mcp_helpers import ROLE, b64, error_text, run, tone, wav  # noqa: E402
from mcp_helpers import model, folders, backend, ferryman  # noqa: E402,F401 (fixtures)


def test_cancel_and_end_session(backend, ferryman) -> None:
    """A cancelled call frees the engine at once; end_session stops a running conversation early."""

    async def go():
        async with Client(build_server(backend)) as client:
            first = anyio.Event()

            async def on_progress(done, total, message):
                if done > 0:
                    first.set()

            async with anyio.create_task_group() as tg:
                async def call():
                    await client.call_tool("run_scene", {"character_a": ferryman, "character_b": ferryman,
                                                         "seconds": 30}, progress_callback=on_progress)

                tg.start_soon(call)
                await first.wait()
                tg.cancel_scope.cancel()
            scene = [r for r in backend.records.values() if r.kind == "scene"][-1]
            assert scene.status == "cancelled" and 0 < scene.seconds < 30
            assert backend.engine().sessions == [] and not backend.engine_lock().locked()

            # end_session from another request while talk runs: the call returns early with what it has
            started = anyio.Event()
            results = {}

            async def on_talk_progress(done, total, message):
                if done > 0:
                    started.set()

            async with anyio.create_task_group() as tg:
                async def talk():
                    results["talk"] = await client.call_tool(
                        "talk_to_character", {"character": ferryman, "audio_base64": b64(wav(tone(20.0)))},
                        progress_callback=on_talk_progress)

                tg.start_soon(talk)
                await started.wait()
                session = [r for r in backend.records.values() if r.kind == "talk"][-1].id
                stopping = await client.call_tool("end_session", {"session": session})
                assert stopping.structured_content["status"] == "stopping"
            summary = results["talk"].structured_content
            assert summary["status"] == "ended" and 0 < summary["seconds"] < 20
            assert backend.engine().sessions == []

    run(go())


def test_player_session_embedded(model, folders, ferryman) -> None:
    from npc_voice.client import NPCVoiceClient

    backend = Backend(Settings(characters=folders["characters"], player_slots=1), model=model)

    async def go():
        async with Client(build_server(backend)) as client:
            assert "unknown character" in error_text(await client.call_tool("start_player_session",
                                                                            {"character": "ghost"}))
            info = (await client.call_tool("start_player_session", {"character": ferryman})).structured_content
            assert info["websocket_url"].startswith("ws://127.0.0.1:") and info["websocket_url"].endswith("/ws")
            assert len(info["token"]) >= 16 and info["start_message"]["character"] == ferryman
            # a game client uses exactly what it was given
            async with NPCVoiceClient(info["websocket_url"], info["token"]) as game:
                session = await game.start(character=info["start_message"]["character"], seed=1)
                await session.send_audio(tone(0.3))
                assert await read_audio_frames(session, 3) == 3
                await session.end()
            status = (await client.call_tool("server_status", {})).structured_content
            assert status["player_server"]["url"] == info["websocket_url"]
            ended = (await client.call_tool("end_session", {"session": info["session"]})).structured_content
            assert ended["status"] == "ended" and "stopped" in ended["message"]
            assert (await client.call_tool("server_status", {})).structured_content["player_server"] is None

    try:
        run(go())
    finally:
        backend.close()


def test_the_character_checks_use_the_models_context(model, folders) -> None:
    """A character's prompt is held to the context the MCP server runs with (`--context`, then the
    loaded model's), not PersonaPlex's 3000 frames."""
    import dataclasses

    from npc_voice.characters import Character, CharacterError

    root = folders["root"] / "context-chars"
    lazy = Backend(Settings(characters=root, context=100))  # no model loaded yet: the --context setting
    try:
        assert lazy.store.context_frames == 100
        character = Character.parse({"id": "gatekeeper", "name": "Gatekeeper", "role": ROLE})
        with pytest.raises(CharacterError, match="half or more of the 100-frame context"):
            lazy.store.create(character, folders["audio"] / "voice.wav")  # 2.5 s: 32 voice frames + 12 + role
        assert "gatekeeper" not in lazy.store
    finally:
        lazy.close()
    short = random_model(dataclasses.replace(model.config, lm=dataclasses.replace(model.config.lm, context=120)))
    loaded = Backend(Settings(characters=root), model=short)
    try:
        assert loaded.store.context_frames == 120
    finally:
        loaded.close()
    roomy = Backend(Settings(characters=root), model=model)
    try:
        assert roomy.store.context_frames == model.config.lm.context
        assert roomy.store.create(character, folders["audio"] / "voice.wav").ok
    finally:
        roomy.close()
