"""npc_voice/serve/cli.py: `npc-voice serve` as its own process, shut down by a real signal."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.error
import urllib.request

import pytest

from npc_voice.client import AudioFrame, NPCVoiceClient
from npc_voice.protocol import Ended, ErrorMsg, State, Text
from conftest import serve_process
from serve_helpers import CAST, run


def _serve(*extra: str):
    """`npc-voice serve` on the tiny model as a child process, up once /health answers: (process, port, health)."""
    return serve_process("--slots", "2", "--threads", "1", "--characters", str(CAST), "--log-level", "WARNING", *extra)


def _silent_websocket(port: int) -> socket.socket:
    """A websocket client that completes the handshake and then reads nothing, nor answers the close:
    the server keeps it for its grace period (close_grace_s), the window this test looks into."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_serve_shuts_down_gracefully_on_a_signal(sig: str) -> None:
    """SIGTERM or SIGINT to `npc-voice serve`: a live session gets `error` shutting_down (fatal), then
    `ended` (reason shutting_down), then close 1001; while the server waits for its last connection
    to close, a handshake gets HTTP 503 `shutting_down` and /health says `stopping`; then it exits 0."""
    import signal

    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus

    with _serve() as (proc, port, _):
        url = f"ws://127.0.0.1:{port}/ws"
        async def main() -> None:
            async with NPCVoiceClient(url) as client:
                session = await client.start("innkeeper")
                assert isinstance(await session.next_event(timeout=10), (AudioFrame, Text, State))  # live
                silent = _silent_websocket(port)
                proc.send_signal(getattr(signal, sig))
                events = [e async for e in session.events() if not isinstance(e, (AudioFrame, Text, State))]
                assert [type(e) for e in events] == [ErrorMsg, Ended], events
                assert events[0].code == "shutting_down" and events[0].fatal
                assert events[1].reason == "shutting_down" and events[1].session == session.id
                await asyncio.wait_for(client._reader, 5)  # the server closes the connection
                assert client.ws.close_code == 1001
                assert proc.poll() is None  # still in its grace period (the silent client)
                with pytest.raises(InvalidStatus) as info:
                    await connect(url)
                assert info.value.response.status_code == 503
                assert json.loads(info.value.response.body)["code"] == "shutting_down"
                with pytest.raises(urllib.error.HTTPError) as err:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
                assert err.value.code == 503 and json.load(err.value)["status"] == "stopping"
                silent.close()

        run(main(), timeout=60)
        assert proc.wait(timeout=20) == 0
        output = proc.stdout.read()
        assert "Traceback" not in output, output


def test_a_second_signal_cuts_the_drain_short() -> None:
    """docs/deploy.md: SIGTERM with --drain-grace lets live sessions go on; a second signal during
    the drain ends them at once (`shutting_down`), not at the end of the grace period."""
    import signal

    with _serve("--drain-grace", "30") as (proc, port, _):
        url = f"ws://127.0.0.1:{port}/ws"
        async def main() -> float:
            async with NPCVoiceClient(url) as client:
                session = await client.start("innkeeper")
                assert isinstance(await session.next_event(timeout=10), (AudioFrame, Text, State))  # live
                proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(1.0)
                assert isinstance(await session.next_event(timeout=5), (AudioFrame, Text, State))  # still draining
                t0 = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                events = [e async for e in session.events() if not isinstance(e, (AudioFrame, Text, State))]
                assert [type(e) for e in events] == [ErrorMsg, Ended] and events[0].code == "shutting_down"
                return time.monotonic() - t0

        assert run(main(), timeout=60) < 10  # not the 30 s grace
        assert proc.wait(timeout=20) == 0
