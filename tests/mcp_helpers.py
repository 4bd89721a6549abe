"""Shared by the MCP server's tests (tests/test_mcp_*.py): generated voices and short clips, the
`tiny` model, an embedded `Backend` over temporary folders and the `ferryman` character created through
the MCP tool (module-scoped fixtures: each test module that imports them gets its own), and what every
transport's tools/list must publish."""

from __future__ import annotations

import asyncio
import base64
import io
from pathlib import Path

import anyio
import numpy as np
import pytest
import soundfile

from mcp import Client
from mcp.types import INVALID_PARAMS, AudioContent

from mcp_server import Backend, Settings, build_server
from npc_voice.model.loading import random_model


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


def talks_side_by_side(backend, character: str, seconds: float) -> None:
    """Two `talk_to_character` calls at once through the SDK's client (seeds 1 and 2, `seconds` of
    tone each): both finish with `seconds` of reply, and neither waited for the other (each one's
    first progress report came before the other's last)."""
    progress: dict[str, list[float]] = {"a": [], "b": []}
    results = {}

    async def go():
        async with Client(build_server(backend)) as client:
            async def talk(name: str, seed: int) -> None:
                async def on_progress(done, total, message):
                    if done > 0:
                        progress[name].append(anyio.current_time())

                results[name] = await client.call_tool(
                    "talk_to_character", {"character": character, "audio_base64": b64(wav(tone(seconds, seed=seed))),
                                          "seed": seed, "audio_output": "none"}, progress_callback=on_progress)

            async with anyio.create_task_group() as tg:
                tg.start_soon(talk, "a", 1)
                tg.start_soon(talk, "b", 2)

    run(go())
    for name in "ab":
        assert not results[name].is_error, results[name].content[0].text
        assert results[name].structured_content["status"] == "finished"
        assert results[name].structured_content["seconds"] == pytest.approx(seconds)
    a, b = progress["a"], progress["b"]
    assert a[0] < b[-1] and b[0] < a[-1]  # their runs overlap in time


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
