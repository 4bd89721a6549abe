"""mcp_server/audio_files.py: audio files are read only from the allowed folder, and replies are
written to its replies/ folder (or left out), never through a link leading outside it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile

pytest.importorskip("mcp")

from mcp import Client  # noqa: E402

from mcp_server import Backend, Settings, build_server  # noqa: E402
from mcp_helpers import RATE, ROLE, b64, decode_wav, error_text, run, tone, wav  # noqa: E402
from mcp_helpers import model, folders, backend, ferryman  # noqa: E402,F401 (fixtures)


def test_audio_files_refused_without_an_allowed_folder(model, folders) -> None:
    backend = Backend(Settings(characters=folders["root"] / "other-chars"), model=model)

    async def go():
        async with Client(build_server(backend)) as client:
            result = await client.call_tool("create_character", {"id": "x", "name": "X", "role": ROLE,
                                                                 "voice_file": str(folders["audio"] / "voice.wav")})
            assert "no allowed audio folder" in error_text(result)

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
