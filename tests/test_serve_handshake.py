"""npc_voice/serve/handshake.py and health.py on the real server: the token check (401), other paths
(404), and /health open without the token, while a witness session streams undisturbed."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request

import pytest

from npc_voice.client import NPCVoiceClient, NPCVoiceError
from serve_helpers import Witness, expect, health, make_server, run
from serve_helpers import model, cache, store  # noqa: F401 (fixtures)


@pytest.mark.realtime
def test_token_and_health(model, cache, store, timing) -> None:
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus

    token = "test-token-0123456789abcdef"
    bg = make_server(model, cache, store, slots=1, token=token)
    try:
        async def main() -> None:
            stop = asyncio.Event()
            witness = Witness(bg.url, token=token)
            task = asyncio.create_task(witness.run(stop))
            await asyncio.wait_for(witness.ready.wait(), 30)
            since = time.monotonic()
            for headers in (None, {"Authorization": "Bearer wrong-token-0123456789"}):
                with pytest.raises(InvalidStatus) as info:
                    await connect(bg.url, additional_headers=headers)
                assert info.value.response.status_code == 401
                assert json.loads(info.value.response.body)["code"] == "unauthorized"
            with pytest.raises(InvalidStatus):
                await connect(bg.url + "?token=nope")
            async with connect(bg.url + f"?token={token}") as ws:
                await expect(ws, "hello")
            async with NPCVoiceClient(bg.url, token=token) as client:
                assert client.hello.protocol == 1
            with pytest.raises(NPCVoiceError) as refusal:  # the Python client names the refusal
                await NPCVoiceClient(bg.url, token="wrong-token-0123456789").connect()
            assert refusal.value.code == "unauthorized"
            with pytest.raises(InvalidStatus) as info:
                await connect(bg.url.replace("/ws", "/elsewhere"), additional_headers={"Authorization": f"Bearer {token}"})
            assert info.value.response.status_code == 404
            h = health(bg)  # open without the token (load balancers); it tells nothing secret
            assert h["status"] == "ok" and h["model"] == "tiny" and h["device"] == "cpu"
            assert h["slots"] == {"total": 1, "used": 1, "free": 0} and h["engine_sessions"] == 1
            await asyncio.sleep(0.3)
            stop.set()
            await task
            witness.check(since, timing)

        run(main())
        h = health(bg)
        assert h["tick_ms"]["p50"] > 0 and h["tick_ms"]["p99"] >= h["tick_ms"]["p50"]
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"http://127.0.0.1:{bg.server.port}/nothing", timeout=5)
        assert err.value.code == 404
    finally:
        bg.stop()
    timing.verdict()


def test_a_plain_http_request_to_a_websocket_endpoint_is_426_json(model, cache, store) -> None:
    """`curl http://host/ws`: HTTP 426 with the documented JSON body (`upgrade_required`), not the
    websocket library's plain-text refusal and a logged traceback."""
    bg = make_server(model, cache, store, slots=1)
    try:
        for path in ("/ws", "/v1/realtime"):
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(bg.url.replace("ws://", "http://").replace("/ws", path), timeout=5)
            assert err.value.code == 426 and err.value.headers["Upgrade"] == "websocket"
            assert json.load(err.value)["code"] == "upgrade_required"
    finally:
        bg.stop()
