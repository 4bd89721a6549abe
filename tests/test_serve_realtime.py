"""`/v1/realtime` of a real `npc-voice serve` (tiny model) driven by the official `openai` SDK, beside
a client of our own protocol (`/ws`) that must keep real time (docs/realtime.md)."""

from __future__ import annotations

import asyncio
import base64
import time
from pathlib import Path

import numpy as np
import pytest

from npc_voice.client import AudioFrame, NPCVoiceClient
from conftest import serve_child, stream_silence

openai = pytest.importorskip("openai")

CAST = Path(__file__).resolve().parents[1] / "characters"
TOKEN = "realtime-test-token-0123456789"
CHUNK = base64.b64encode((3000 * np.sin(np.arange(1920) / 7)).astype("<i2").tobytes()).decode()  # 80 ms, 24 kHz


async def next_of(conn, kind: str, timeout: float = 20.0, seen: list | None = None):
    """The next server event of type `kind` (the others are collected in `seen`)."""
    deadline = time.monotonic() + timeout
    while True:
        ev = await asyncio.wait_for(conn.recv(), max(0.01, deadline - time.monotonic()))
        if seen is not None:
            seen.append(ev)
        if ev.type == kind:
            return ev


@pytest.mark.realtime
def test_openai_sdk_against_the_realtime_endpoint(timing) -> None:
    from openai import AsyncOpenAI

    with serve_child("--slots", "3", "--threads", "1", "--characters", str(CAST), "--token", TOKEN,
                     "--log-level", "WARNING") as (port, health):
        async def witness(stop: asyncio.Event, frames: list) -> None:
            async with NPCVoiceClient(f"ws://127.0.0.1:{port}/ws", token=TOKEN) as client:
                session = await client.start("city-guard")

                feeder = asyncio.create_task(stream_silence(session))
                async for ev in session.events():
                    if isinstance(ev, AudioFrame):
                        frames.append((time.monotonic(), ev.frame))
                    if stop.is_set():
                        break
                feeder.cancel()

        async def main() -> dict:
            stop, frames = asyncio.Event(), []
            w = asyncio.create_task(witness(stop, frames))
            client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=TOKEN)
            out: dict = {}
            async with client.realtime.connect(model="gpt-realtime") as conn:
                assert (await next_of(conn, "session.created")).session.model == "gpt-realtime"
                await conn.session.update(session={"type": "realtime", "audio": {
                    "input": {"format": {"type": "audio/pcm", "rate": 24000}},
                    "output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": "innkeeper"}}})
                updated = await next_of(conn, "session.updated", 60)
                assert updated.session.audio.output.voice == "innkeeper"

                async def stream(seconds: float) -> None:
                    t0 = time.monotonic()
                    for i in range(int(seconds / 0.08)):
                        await conn.input_audio_buffer.append(audio=CHUNK)
                        await asyncio.sleep(max(0.0, t0 + (i + 1) * 0.08 - time.monotonic()))

                feeder = asyncio.create_task(stream(5.0))  # 5 s of the player's audio, at real time
                seen: list = []
                t0 = time.monotonic()
                while time.monotonic() - t0 < 5.0:
                    seen.append(await asyncio.wait_for(conn.recv(), 10))
                await feeder
                kinds = [ev.type for ev in seen]
                out["deltas"] = [ev for ev in seen if ev.type == "response.output_audio.delta"]
                out["words"] = [ev.delta for ev in seen if ev.type == "response.output_audio_transcript.delta"]
                assert "response.created" in kinds and "error" not in kinds, kinds[:20]
                item_id = next(ev for ev in seen if ev.type == "response.output_item.added").item.id

                # barge-in: the player talks over the NPC, the client stops playback at 400 ms and truncates
                await conn.conversation.item.truncate(item_id=item_id, content_index=0, audio_end_ms=400)
                tail: list = []
                out["truncated"] = await next_of(conn, "conversation.item.truncated", seen=tail)
                out["cancelled"] = [ev for ev in tail if ev.type == "response.done"]

                # hot swap: another character, another response
                await conn.session.update(session={"type": "realtime", "instructions": "You forge swords.",
                                                   "audio": {"output": {"voice": "blacksmith"}}})
                swap: list = []
                out["swapped"] = await next_of(conn, "session.updated", 60, seen=swap)
                out["new_response"] = await next_of(conn, "response.created", 30, seen=swap)
                await next_of(conn, "response.output_audio.delta")

                # a scripted line, and response.create with instructions (both are `say`)
                await conn.conversation.item.create(item={"type": "message", "role": "assistant", "content": [
                    {"type": "output_text", "text": "Mind the snow on the north road."}]})
                out["scripted"] = await next_of(conn, "conversation.item.done")
                await conn.response.create(response={"instructions": "Welcome, traveller!"})

                # bad events: each answered with an error, the connection and the NPC go on
                await conn.send({"type": "conversation.item.delete", "item_id": "x"})
                await conn.send({"type": "input_audio_buffer.append", "audio": "not base64!"})
                await conn.send({"type": "session.update", "session": {"type": "realtime", "output_modalities": ["text"]}})
                errors = []
                for _ in range(3):
                    errors.append((await next_of(conn, "error")).error.code)
                out["errors"] = errors
                await next_of(conn, "response.output_audio.delta")
                out["health"] = await asyncio.to_thread(health)
                # the whole cycle ends with response.done (the current stretch is cancelled)
                await conn.response.cancel()
                out["done"] = await next_of(conn, "response.done")
            stop.set()
            await asyncio.wait_for(w, 10)
            out["witness"] = frames
            return out

        out = asyncio.run(asyncio.wait_for(main(), 240))

    deltas, words = out["deltas"], out["words"]
    assert len(deltas) >= 30 and all(len(base64.b64decode(d.delta)) == 3840 for d in deltas)  # 80 ms PCM16 each
    assert words and all(isinstance(w, str) for w in words)
    assert out["truncated"].audio_end_ms == 400
    assert [d.response.status for d in out["cancelled"]] == ["cancelled"]
    assert out["cancelled"][0].response.output[0].content[0].transcript is not None
    assert out["swapped"].session.audio.output.voice == "blacksmith"
    assert out["swapped"].session.instructions == "You forge swords."
    assert out["scripted"].item.role == "assistant"
    assert out["errors"] == ["unknown_event", "invalid_audio", "unsupported"]
    assert out["done"].response.status == "cancelled"
    protocols = out["health"]["protocols"]
    assert protocols["realtime"]["connections"] == 1 and protocols["ws"]["connections"] == 1
    assert protocols["realtime"]["sessions"] == 1 and protocols["ws"]["sessions"] == 1
    # the /ws witness: no gap, and real-time pace while the Realtime client did all that
    frames = out["witness"]
    indices = [f for _, f in frames]
    assert indices == list(range(indices[0], indices[0] + len(indices))), "a gap in the witness's frames"
    span = frames[-1][0] - frames[0][0]
    rate = (len(frames) - 1) / span if span > 0 else 0.0
    timing.check(abs(rate - 12.5) < 1.0, f"witness at {rate:.2f} frames/s over {span:.1f} s")
    timing.verdict()


def test_wrong_token_and_unknown_voice() -> None:
    from openai import AsyncOpenAI

    with serve_child("--slots", "1", "--threads", "1", "--characters", str(CAST), "--token", TOKEN,
                     "--log-level", "WARNING") as (port, _):
        async def main() -> list:
            bad = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong")
            with pytest.raises(Exception, match="401"):
                async with bad.realtime.connect(model="innkeeper"):
                    pass
            client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=TOKEN)
            async with client.realtime.connect(model="innkeeper") as conn:  # ?model= names a character
                await next_of(conn, "response.output_audio.delta", 60)
                await conn.session.update(session={"type": "realtime", "audio": {"output": {"voice": "nobody"}}})
                err = await next_of(conn, "error", 30)
                await conn.response.create(response={"instructions": "Still here."})
                await next_of(conn, "response.output_audio.delta")  # the innkeeper goes on
                return [err.error.code, err.error.type]

        assert asyncio.run(asyncio.wait_for(main(), 120)) == ["unknown_character", "invalid_request_error"]
