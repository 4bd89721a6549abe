"""mcp_server/app.py through the SDK's own client, in process (the SDK's in-process connection to an
MCPServer), on the `tiny` model with generated voices: the tools, resource templates and prompt it
lists, and the character tools (create, update, delete) with their errors in plain words."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("mcp")

from mcp import Client, MCPError  # noqa: E402

from mcp_server import build_server  # noqa: E402
from mcp_helpers import RESOURCE_NOT_FOUND, ROLE, b64, error_text, run, tone, wav  # noqa: E402
from mcp_helpers import model, folders, backend, ferryman  # noqa: E402,F401 (fixtures)


def test_listing_prompt_and_resources(backend, ferryman) -> None:
    async def go():
        async with Client(build_server(backend)) as client:
            tools = {t.name for t in (await client.list_tools()).tools}
            assert {"list_characters", "get_character", "create_character", "update_character", "delete_character",
                    "list_voices", "start_player_session", "talk_to_character", "run_scene", "get_transcript",
                    "end_session", "server_status"} <= tools
            templates = {t.uri_template for t in (await client.list_resource_templates()).resource_templates}
            assert templates == {"character://{id}", "transcript://{session}"}
            prompt = await client.get_prompt("write_role_prompt", {"character": "a grumpy miller", "facts": "flour 2c"})
            text = prompt.messages[0].content.text
            assert "a grumpy miller" in text and "Your name is" in text and "create_character" in text

            listed = (await client.call_tool("list_characters", {})).structured_content
            assert [c["id"] for c in listed["characters"]] == ["ferryman"]
            assert (await client.call_tool("list_characters", {"tag": "nope"})).structured_content["characters"] == []
            got = (await client.call_tool("get_character", {"id": "ferryman"})).structured_content
            assert got["character"]["role"] == ROLE and got["character"]["lines"] == {"greeting": "A coin, traveller."}
            assert got["validation"]["ok"]
            resource = await client.read_resource("character://ferryman")
            assert json.loads(resource.contents[0].text)["name"] == "Charon"
            voices = (await client.call_tool("list_voices", {})).structured_content
            assert "hello.wav" in voices["audio_folder"]["files"] and "NATF2" in voices["presets"]["known_names"]
            # offered: what audio_file accepts (a link staying inside), never a link out of the folder
            assert "alias.wav" in voices["audio_folder"]["files"] and "escape.wav" not in voices["audio_folder"]["files"]
            assert voices["character_voices"] == {"ferryman": "voice.wav"}
            status = (await client.call_tool("server_status", {})).structured_content
            assert status["mode"] == "embedded" and "RANDOM weights" in status["warning"]

    run(go())


def test_character_create_update_delete(backend, folders) -> None:
    async def go():
        async with Client(build_server(backend)) as client:
            created = await client.call_tool("create_character", {
                "id": "guard", "name": "Tomas", "role": "You are a city guard. Your name is Tomas.",
                "voice_file": "voice.wav"})
            assert not created.is_error, created.content[0].text
            voice = (folders["characters"] / "guard" / "voice.wav").read_bytes()
            updated = await client.call_tool("update_character", {"id": "guard", "name": "Sergeant Tomas",
                                                                   "text_temperature": 0.5})
            assert updated.structured_content["updated"]["name"] == "Sergeant Tomas"
            c = backend.store.load("guard")
            assert c.role.startswith("You are a city guard") and c.sampling.text_temperature == 0.5
            assert (folders["characters"] / "guard" / "voice.wav").read_bytes() == voice  # kept
            new_voice = await client.call_tool("update_character", {"id": "guard", "voice_base64": b64(wav(tone(3.0, 400.0)))})
            assert not new_voice.is_error
            assert (folders["characters"] / "guard" / "voice.wav").read_bytes() != voice
            assert (await client.call_tool("delete_character", {"id": "guard"})).structured_content == {"deleted": "guard"}
            assert "guard" not in backend.store
            before = sorted(p.name for p in folders["characters"].iterdir())
            again = error_text(await client.call_tool("delete_character", {"id": "guard"}))  # a repeat: no further effect
            assert "unknown character" in again and sorted(p.name for p in folders["characters"].iterdir()) == before

    run(go())


def test_character_errors(backend, folders, ferryman) -> None:
    role = "You are a baker. Your name is Ann."

    async def go():
        async with Client(build_server(backend)) as client:
            async def create(**voice):
                return await client.call_tool("create_character", {"id": "baker", "name": "Ann", "role": role} | voice)

            assert "unknown character 'nobody'" in error_text(await client.call_tool("get_character", {"id": "nobody"}))
            assert "unknown character" in error_text(await client.call_tool("delete_character", {"id": "nobody"}))
            assert "unknown character" in error_text(await client.call_tool("update_character", {"id": "nobody",
                                                                                                 "name": "X"}))
            assert "exactly one voice" in error_text(await create())
            assert "exactly one voice" in error_text(await create(voice_preset="NATF2", voice_file="voice.wav"))
            assert "not valid base64" in error_text(await create(voice_base64="%%% not base64 %%%"))
            assert "cannot read" in error_text(await create(voice_base64=b64(b"definitely not audio" * 10)))
            assert "cannot read" in error_text(await create(voice_file="garbage.wav"))
            assert "shorter than 2 s" in error_text(await create(voice_base64=b64(wav(tone(0.5)))))
            # paths outside the allowed folder, however spelled, are refused before anything is read
            outside = folders["outside"] / "secret.wav"
            for path in (str(outside), "../outside/secret.wav", "escape.wav"):
                assert "outside the allowed audio folder" in error_text(await create(voice_file=path)), path
            assert "no audio file" in error_text(await create(voice_file="missing.wav"))
            assert "not a safe id" in error_text(await client.call_tool("create_character", {
                "id": "../evil", "name": "E", "role": role, "voice_file": "voice.wav"}))
            assert "already exists" in error_text(await client.call_tool("create_character", {
                "id": "ferryman", "name": "E", "role": role, "voice_file": "voice.wav"}))
            with pytest.raises(MCPError, match="unknown character 'nobody'") as err:  # resource not found
                await client.read_resource("character://nobody")
            assert err.value.error.code == RESOURCE_NOT_FOUND
            assert "baker" not in backend.store

    run(go())
