"""mcp_server/cli.py: `python -m mcp_server` as a subprocess over stdio and over streamable HTTP,
driven by the SDK's own client, and the bind it refuses."""

from __future__ import annotations

import json
import os
import sys

import anyio
import pytest

pytest.importorskip("mcp")

from mcp import Client, StdioServerParameters  # noqa: E402

from mcp_helpers import (  # noqa: E402
    RATE, REPO, ROLE, b64, check_tool_list, decode_wav, error_text, package_version, run, tone, wav,
)
from mcp_helpers import folders  # noqa: E402,F401 (fixtures)


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


def test_cli_refuses_an_8bit_cache_or_fp8_weights_on_a_cpu_at_start_up(tmp_path, capsys) -> None:
    from mcp_server.cli import build_parser, main, settings_from_args

    for flags, named in ((["--kv-dtype", "int8"], "--kv-dtype int8"), (["--weights-dtype", "fp8"], "--weights-dtype fp8")):
        assert main([*flags, "--device", "cpu", "--characters", str(tmp_path)]) == 2
        assert named in capsys.readouterr().err
    args = build_parser().parse_args(["--kv-dtype", "bf16", "--characters", str(tmp_path)])
    assert settings_from_args(args).kv_dtype == "bf16"  # passed on to the embedded model's loader
