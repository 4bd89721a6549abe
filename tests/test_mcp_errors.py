"""mcp_server/errors.py: arguments outside the published limits, and unreadable audio, are refused
in plain words (never pydantic's dump or a buffer's repr)."""

from __future__ import annotations


import pytest

pytest.importorskip("mcp")

from mcp import Client  # noqa: E402

from mcp_server import build_server  # noqa: E402
from mcp_helpers import ROLE, SEED_MAX, b64, error_text, run, tone, wav  # noqa: E402
from mcp_helpers import model, folders, backend, ferryman  # noqa: E402,F401 (fixtures)


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
