"""The MCP server (mcp_server, docs/mcp.md) through the SDK's own client: in process (the SDK's
in-process connection to an MCPServer) and over stdio (`python -m mcp_server` as a subprocess), on
the `tiny` model with generated voices and short clips."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import sys
from pathlib import Path

import anyio
import numpy as np
import pytest
import soundfile

pytest.importorskip("mcp")

from mcp import Client, MCPError, StdioServerParameters  # noqa: E402
from mcp.types import INVALID_PARAMS, AudioContent  # noqa: E402

from mcp_server import Backend, Settings, build_server  # noqa: E402
from npc_voice.audio import float_to_pcm16  # noqa: E402
from npc_voice.model.loading import random_model  # noqa: E402
from conftest import read_audio_frames  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RATE = 24_000
# MCP's resource-not-found error: the SDK's ResourceNotFoundError, sent as invalid params (SEP-2164)
RESOURCE_NOT_FOUND = INVALID_PARAMS
ROLE = "You are a ferryman on the black river. Your name is Charon. You ask every traveller for a coin."


def tone(seconds: float, freq: float = 220.0, noise: float = 0.02, seed: int = 0) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    rng = np.random.default_rng(seed)
    x = 0.3 * np.sin(2 * np.pi * freq * t) * (1 + 0.3 * np.sin(2 * np.pi * 3 * t)) + noise * rng.standard_normal(t.shape)
    return x.astype(np.float32)


def wav(samples: np.ndarray, rate: int = RATE) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, subtype="PCM_16", format="WAV")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def run(coro, timeout: float = 120.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def error_text(result) -> str:
    assert result.is_error, result
    return result.content[0].text


def decode_wav(content: AudioContent) -> tuple[np.ndarray, int]:
    assert content.type == "audio" and content.mime_type == "audio/wav"
    data, rate = soundfile.read(io.BytesIO(base64.b64decode(content.data)), dtype="float32", always_2d=True)
    return data, rate


@pytest.fixture(scope="module")
def model():
    return random_model("tiny")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("mcp")
    chars, audio, outside = root / "characters", root / "audio", root / "outside"
    chars.mkdir()
    audio.mkdir()
    outside.mkdir()
    (audio / "voice.wav").write_bytes(wav(tone(2.5, 180.0)))
    (audio / "hello.wav").write_bytes(wav(tone(1.0, 300.0, seed=1)))
    (audio / "garbage.wav").write_bytes(b"RIFF not really a wav file")
    (outside / "secret.wav").write_bytes(wav(tone(2.5)))
    (audio / "escape.wav").symlink_to(outside / "secret.wav")  # a link inside pointing outside
    (audio / "alias.wav").symlink_to(audio / "hello.wav")  # a link that stays inside
    return {"root": root, "characters": chars, "audio": audio, "outside": outside}


@pytest.fixture(scope="module")
def backend(model, folders):
    backend = Backend(Settings(characters=folders["characters"], audio_dir=folders["audio"], busy_wait_s=0.5),
                      model=model)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def ferryman(backend):
    """A character created through the MCP tool with a base64 voice clip."""

    async def go():
        async with Client(build_server(backend)) as client:
            return await client.call_tool("create_character", {
                "id": "ferryman", "name": "Charon", "role": ROLE, "voice_base64": b64(wav(tone(2.5, 150.0))),
                "tags": ["river"], "lines": {"greeting": "A coin, traveller."}})

    result = run(go())
    assert not result.is_error, result.content[0].text
    return "ferryman"


# --- characters ------------------------------------------------------------------------------------


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


def test_audio_files_refused_without_an_allowed_folder(model, folders) -> None:
    backend = Backend(Settings(characters=folders["root"] / "other-chars"), model=model)

    async def go():
        async with Client(build_server(backend)) as client:
            result = await client.call_tool("create_character", {"id": "x", "name": "X", "role": ROLE,
                                                                 "voice_file": str(folders["audio"] / "voice.wav")})
            assert "no allowed audio folder" in error_text(result)

    run(go())


# --- what the tools say about themselves -------------------------------------------------------------

SEED_MAX = 2**31 - 2  # one maximum for every seed (a scene's second NPC takes seed + 1)
READ_ONLY = {"list_characters", "get_character", "list_voices", "get_transcript", "server_status"}
DESTRUCTIVE = {"update_character", "delete_character", "end_session"}
CONVERSATIONS = {"start_player_session", "talk_to_character", "say", "run_scene"}


def package_version() -> str:
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def check_tool_list(tools, *, remote: bool = False) -> None:
    """Annotations, input limits and output schemas as published in tools/list."""
    by_name = {t.name: t for t in tools}
    assert READ_ONLY | DESTRUCTIVE | CONVERSATIONS | {"create_character"} <= set(by_name)
    for name, tool in by_name.items():
        hints = tool.annotations
        assert hints is not None and hints.title, name
        assert hints.read_only_hint is (name in READ_ONLY), name
        assert hints.destructive_hint is (name in DESTRUCTIVE), name
        assert hints.idempotent_hint is (name in READ_ONLY | DESTRUCTIVE and name != "server_status"), name
        # only what talks to another npc-voice serve reaches outside this server
        reaches_out = remote and name in CONVERSATIONS | {"end_session", "server_status"}
        assert hints.open_world_hint is reaches_out, name
        assert tool.output_schema is not None and tool.output_schema["type"] == "object", name
        assert tool.output_schema.get("properties"), name  # fields spelled out, not a bare object
    props = {name: t.input_schema["properties"] for name, t in by_name.items()}
    for name in ("talk_to_character", "say", "run_scene"):
        assert props[name]["seed"]["minimum"] == 0 and props[name]["seed"]["maximum"] == SEED_MAX, name
        assert props[name]["audio_output"]["enum"] == ["inline", "file", "none"], name
        reply = by_name[name].output_schema
        assert {"session", "words", "speakers", "audio", "audio_output", "transcript_uri"} <= set(reply["required"])
        assert {"audio_file", "audio_path"} <= set(reply["properties"]), name
    assert props["run_scene"]["seconds"]["exclusiveMinimum"] == 0 and props["run_scene"]["seconds"]["maximum"] == 120
    assert props["say"]["seconds"]["anyOf"][0]["maximum"] == 60 and props["say"]["text"]["anyOf"][0]["maxLength"] == 1000
    assert props["start_player_session"]["sample_rate"]["enum"] == [16000, 24000, 48000]
    for name in ("create_character", "update_character"):
        t = props[name]["text_temperature"]["anyOf"][0]
        assert (t["minimum"], t["maximum"]) == (0, 2), name
    listed = by_name["list_characters"].output_schema
    assert set(listed["required"]) == {"characters", "broken", "folder"}


def test_tools_describe_themselves(backend) -> None:
    async def go(server):
        async with Client(server) as client:
            assert client.server_info.name == "npc-voice" and client.server_info.version == package_version()
            return (await client.list_tools()).tools

    check_tool_list(run(go(build_server(backend))))
    remote = Backend(Settings(characters=backend.store.root, server_url="ws://127.0.0.1:9"))
    check_tool_list(run(go(build_server(remote))), remote=True)


# --- conversations (embedded engine) ----------------------------------------------------------------


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


def test_plain_errors(backend, ferryman) -> None:
    """Arguments outside the published limits, and unreadable audio, are refused in plain words."""
    raw = ("validation error for", "type=", "pydantic", "<_io", "object at 0x", "Arguments\n")

    async def go():
        async with Client(build_server(backend)) as client:
            async def refused(tool: str, args: dict) -> str:
                text = error_text(await client.call_tool(tool, args))
                assert not any(r in text for r in raw), text
                return text

            clip = b64(wav(tone(1.0)))
            assert "seed must be at least 0 (got -1)" in await refused(
                "talk_to_character", {"character": ferryman, "audio_base64": clip, "seed": -1})
            assert f"seed must be at most {SEED_MAX} (got {SEED_MAX + 1})" in await refused(
                "run_scene", {"character_a": ferryman, "character_b": ferryman, "seed": SEED_MAX + 1})
            assert 'seconds must be a number (got "soon")' in await refused(
                "run_scene", {"character_a": ferryman, "character_b": ferryman, "seconds": "soon"})
            assert "seconds must be above 0" in await refused(
                "run_scene", {"character_a": ferryman, "character_b": ferryman, "seconds": 0})
            assert "sample_rate must be 16000, 24000 or 48000 (got 22050)" in await refused(
                "start_player_session", {"character": ferryman, "sample_rate": 22050})
            text = await refused("create_character", {"id": "x"})
            assert "name is required" in text and "role is required" in text
            assert "text_temperature must be at most 2" in await refused(
                "update_character", {"id": ferryman, "text_temperature": 3})
            assert "audio_output must be 'inline', 'file' or 'none'" in await refused(
                "talk_to_character", {"character": ferryman, "audio_base64": clip, "audio_output": "mp3"})
            assert "text must be at most 1000 characters" in await refused("say", {"character": ferryman,
                                                                                    "text": "a" * 1001})
            # audio that is not audio: the reason, not the repr of a buffer
            text = await refused("talk_to_character", {"character": ferryman, "audio_base64": b64(b"\x00garbage" * 40)})
            assert "unreadable audio: cannot read audio data: Format not recognised" in text
            text = await refused("create_character", {"id": "x", "name": "X", "role": ROLE,
                                                      "voice_base64": b64(b"\x00garbage" * 40)})
            assert "cannot read audio data: Format not recognised" in text
            assert "x" not in backend.store

    run(go())


def test_audio_output_file_and_none(backend, folders, ferryman) -> None:
    """A reply without inline base64: written to <audio folder>/replies (its path returned) or left out."""
    clip = tone(1.0, 300.0, seed=4)

    async def go():
        async with Client(build_server(backend)) as client:
            args = {"character": ferryman, "audio_base64": b64(wav(clip)), "seed": 2}
            inline = await client.call_tool("talk_to_character", args)
            assert inline.structured_content["audio_output"] == "inline"
            assert [c.type for c in inline.content] == ["text", "audio"]
            expected, _ = decode_wav(inline.content[1])

            written = await client.call_tool("talk_to_character", args | {"audio_output": "file"})
            assert not written.is_error, written.content[0].text
            summary = written.structured_content
            assert [c.type for c in written.content] == ["text"]  # no base64 anywhere
            assert summary["audio_file"] == f"replies/{summary['session']}.wav"
            path = folders["audio"] / summary["audio_file"]
            assert summary["audio_path"] == str(path) and json.loads(written.content[0].text) == summary
            samples, rate = soundfile.read(path, dtype="float32", always_2d=True)
            assert rate == RATE and np.array_equal(samples, expected)  # the same seed: the same reply
            assert len(written.content[0].text) < 20_000
            # the written reply is a file of the allowed folder: usable as another call's audio_file
            again = await client.call_tool("talk_to_character", {"character": ferryman,
                                                                 "audio_file": summary["audio_file"]})
            assert not again.is_error and again.structured_content["seconds"] == pytest.approx(1.04)

            before = sorted((folders["audio"] / "replies").iterdir())
            bare = await client.call_tool("talk_to_character", args | {"audio_output": "none"})
            assert not bare.is_error and [c.type for c in bare.content] == ["text"]
            assert bare.structured_content["audio_output"] == "none" and "audio_file" not in bare.structured_content
            assert bare.structured_content["words"] == inline.structured_content["words"]
            assert sorted((folders["audio"] / "replies").iterdir()) == before  # nothing written

            scene = await client.call_tool("run_scene", {"character_a": ferryman, "character_b": ferryman,
                                                         "seconds": 0.4, "audio_output": "file"})
            stereo, _ = soundfile.read(folders["audio"] / scene.structured_content["audio_file"], always_2d=True)
            assert stereo.shape == (5 * 1920, 2)

    run(go())

    # without an audio folder: refused before anything runs
    no_folder = Backend(Settings(characters=folders["characters"]), model=backend.model())

    async def refused():
        async with Client(build_server(no_folder)) as client:
            result = await client.call_tool("talk_to_character", {"character": ferryman, "audio_output": "file",
                                                                  "audio_base64": b64(wav(clip))})
            assert "needs an audio folder" in error_text(result) and "--audio-dir" in error_text(result)
            assert no_folder.records == {}

    run(refused())

    # a replies folder that is a symlink leading out of the audio folder: refused, nothing written there
    audio, elsewhere = folders["root"] / "audio-linked", folders["root"] / "elsewhere"
    audio.mkdir()
    elsewhere.mkdir()
    (audio / "replies").symlink_to(elsewhere)
    linked = Backend(Settings(characters=folders["characters"], audio_dir=audio), model=backend.model())

    async def escape():
        async with Client(build_server(linked)) as client:
            result = await client.call_tool("say", {"character": ferryman, "text": "Hi.", "audio_output": "file"})
            assert "leads outside the audio folder" in error_text(result)
            assert linked.records == {} and list(elsewhere.iterdir()) == []

    run(escape())


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


# --- a remote npc-voice serve -----------------------------------------------------------------------


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


# --- over stdio -------------------------------------------------------------------------------------


def test_stdio_subprocess(folders, tmp_path) -> None:
    chars = tmp_path / "chars"
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "mcp_server", "--transport", "stdio", "--characters", str(chars),
              "--audio-dir", str(folders["audio"]), "--threads", "2"],
        env={"PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}, cwd=str(REPO))

    async def go():
        async with Client(params, read_timeout_seconds=90) as client:
            assert client.server_info.version == package_version()
            listed = (await client.list_tools()).tools
            check_tool_list(listed)
            assert "talk_to_character" in {t.name for t in listed}
            created = await client.call_tool("create_character", {
                "id": "miller", "name": "Old Miller", "role": "You are the miller of Mossbrook. Your name is Hob.",
                "voice_base64": b64(wav(tone(2.2, 200.0)))})
            assert not created.is_error, created.content[0].text
            refused = await client.call_tool("create_character", {"id": "x", "name": "X", "role": ROLE,
                                                                  "voice_file": str(folders["outside"] / "secret.wav")})
            assert "outside the allowed audio folder" in error_text(refused)
            assert "seed must be at least 0 (got -1)" in error_text(await client.call_tool(
                "talk_to_character", {"character": "miller", "audio_file": "hello.wav", "seed": -1}))
            said = await client.call_tool("say", {"character": "miller", "text": "Flour.", "audio_output": "file"})
            assert not said.is_error, said.content[0].text
            assert [c.type for c in said.content] == ["text"]
            assert (folders["audio"] / said.structured_content["audio_file"]).is_file()
            result = await client.call_tool("talk_to_character", {"character": "miller", "audio_file": "hello.wav"})
            assert not result.is_error, result.content[0].text
            samples, rate = decode_wav([c for c in result.content if c.type == "audio"][0])
            assert rate == RATE and samples.shape == (RATE, 1)
            session = result.structured_content["session"]
            transcript = json.loads((await client.read_resource(f"transcript://{session}")).contents[0].text)
            assert transcript["session"] == session
            # cancellation over stdio (notifications/cancelled): the scene stops and frees the engine
            moving = anyio.Event()

            async def on_progress(done, total, message):
                if done > 0:
                    moving.set()

            async with anyio.create_task_group() as tg:
                async def scene():
                    await client.call_tool("run_scene", {"character_a": "miller", "character_b": "miller",
                                                         "seconds": 30}, progress_callback=on_progress)

                tg.start_soon(scene)
                await moving.wait()
                tg.cancel_scope.cancel()
            for _ in range(50):
                status = (await client.call_tool("server_status", {})).structured_content
                if status["sessions"][-1]["status"] != "running":
                    break
                await anyio.sleep(0.1)
            assert status["sessions"][-1]["kind"] == "scene" and status["sessions"][-1]["status"] == "cancelled"
            assert status["engine"]["live_sessions"] == 0 and not status["engine"]["busy"]
            assert status["model"]["loaded"] and status["model"]["weights"] == "random"

    run(go(), timeout=150)


def test_streamable_http(folders, tmp_path) -> None:
    import socket
    import subprocess
    import time

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = os.environ | {"PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "mcp_server", "--transport", "http", "--port", str(port),
                             "--characters", str(tmp_path / "chars")], cwd=str(REPO), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()
                time.sleep(0.2)

        async def go():
            async with Client(f"http://127.0.0.1:{port}/mcp") as client:
                assert client.server_info.version == package_version()
                check_tool_list((await client.list_tools()).tools)
                assert "sample_rate must be 16000, 24000 or 48000 (got 8000)" in error_text(await client.call_tool(
                    "start_player_session", {"character": "x", "sample_rate": 8000}))
                listed = await client.call_tool("list_characters", {})
                assert listed.structured_content["characters"] == []
                assert "unknown character" in error_text(await client.call_tool("get_character", {"id": "x"}))
                prompt = await client.get_prompt("write_role_prompt", {"character": "a guard"})
                assert "a guard" in prompt.messages[0].content.text

        run(go(), timeout=60)
    finally:
        proc.terminate()
        proc.wait(10)


def test_cli_refuses_a_public_http_bind(tmp_path) -> None:
    from mcp_server.cli import main

    assert main(["--transport", "http", "--host", "0.0.0.0", "--characters", str(tmp_path)]) == 2
    assert main(["--audio-dir", str(tmp_path / "missing"), "--characters", str(tmp_path)]) == 2


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
