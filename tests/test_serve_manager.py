"""npc_voice/serve/manager.py: the one path from a `start` character to a `Persona` (ids never reach
the file system), and the conversation slots on the real server (busy when full, freed when a
client vanishes)."""

from __future__ import annotations

import asyncio
import base64
import time
from pathlib import Path

import numpy as np
import pytest

from npc_voice.client import AudioFrame, NPCVoiceClient, NPCVoiceError
from npc_voice.protocol import DEFAULT_LIMITS, Dropped, Ended, ErrorCode, ErrorMsg, InlineCharacter, ProtocolError
from npc_voice.serve import BackgroundServer, resolve_character
from serve_helpers import CAST, RATE, Witness, _next_binary, expect, health, run, tone, wait_idle
from serve_helpers import model, cache, store, server  # noqa: F401 (fixtures)


def test_character_ids_never_reach_the_file_system(tmp_path: Path) -> None:
    from npc_voice.characters import CharacterStore

    store = CharacterStore(CAST)
    (tmp_path / "secret").mkdir()
    for bad in ("../secret", "/etc/passwd", "innkeeper/../../x", "..", "INNKEEPER", "a" * 64, "inn keeper", "nobody"):
        with pytest.raises(ProtocolError) as info:
            resolve_character(store, bad, DEFAULT_LIMITS)
        assert info.value.code is ErrorCode.UNKNOWN_CHARACTER, bad
    with pytest.raises(ProtocolError) as info:
        resolve_character(None, "innkeeper", DEFAULT_LIMITS)
    assert info.value.code is ErrorCode.UNKNOWN_CHARACTER
    persona, label = resolve_character(store, "innkeeper", DEFAULT_LIMITS)
    assert label == "innkeeper" and persona.voice_path.endswith("innkeeper/voice.wav")

    def inline(**voice) -> InlineCharacter:
        return InlineCharacter(role="You guard the gate.", voice=voice, name="Guard")

    from npc_voice.audio import wav_bytes

    persona, label = resolve_character(None, inline(wav_base64=base64.b64encode(wav_bytes(tone(2.5, 200))).decode()),
                                       DEFAULT_LIMITS)
    assert label == "Guard" and len(persona.voice_array) == int(2.5 * RATE)
    cases = [(inline(wav_base64=base64.b64encode(b"RIFF nonsense").decode()), "invalid_character"),
             (inline(wav_base64="%%%"), "invalid_character"),
             (inline(wav_base64=base64.b64encode(wav_bytes(tone(0.5, 200))).decode()), "invalid_character"),
             (inline(wav_base64=base64.b64encode(wav_bytes(tone(25.0, 200))).decode()), "voice_too_large"),
             (inline(preset="../../etc/passwd"), "invalid_character"),  # the schema refuses the name
             (inline(preset="NATF2"), "unknown_voice")]  # no preset folder here
    for spec, code in cases:
        with pytest.raises(ProtocolError) as info:
            resolve_character(CharacterStore(CAST, presets_dir=tmp_path), spec, DEFAULT_LIMITS)
        assert info.value.code.value == code, (spec, info.value.message)


def test_full_server_says_busy(server: BackgroundServer) -> None:
    wait_idle(server)

    async def main() -> None:
        async with NPCVoiceClient(server.url) as a, NPCVoiceClient(server.url) as b, \
                NPCVoiceClient(server.url) as c:
            sa = await a.start("innkeeper")
            sb = await b.start("innkeeper")
            assert health(server)["slots"] == {"total": 2, "used": 2, "free": 0}
            with pytest.raises(NPCVoiceError) as info:
                await c.start("innkeeper")
            assert info.value.code == "server_busy"
            with pytest.raises(NPCVoiceError) as info:  # the refused connection stays usable
                await c.start("innkeeper")
            assert info.value.code == "server_busy"
            for live in (sa, sb):  # the two conversations never noticed: every frame, in order
                frames = []
                while len(frames) < 10:
                    event = await live.next_event(timeout=5)
                    assert not isinstance(event, (ErrorMsg, Dropped, Ended)), event
                    if isinstance(event, AudioFrame):
                        frames.append(event.frame)
                assert frames == list(range(frames[0], frames[0] + 10))
            await sa.end()  # a slot frees: the same connection may try again
            sc = await c.start("innkeeper")
            assert sc.id
            assert health(server)["totals"]["refused_busy"] >= 2

    run(main())


@pytest.mark.realtime
def test_vanished_client_frees_its_slot_within_a_frame(server: BackgroundServer, timing) -> None:
    from websockets.asyncio.client import connect

    wait_idle(server)
    engine = server.server.engine

    async def main() -> None:
        stop = asyncio.Event()
        witness = Witness(server.url)
        task = asyncio.create_task(witness.run(stop))
        await asyncio.wait_for(witness.ready.wait(), 30)
        since = time.monotonic()
        ws = await connect(server.url, compression=None)
        await expect(ws, "hello")
        await ws.send('{"type": "start", "character": "innkeeper"}')
        started = await expect(ws, "started")
        for _ in range(5):  # mid-stream: audio both ways
            await ws.send(np.zeros(700, np.int16).tobytes())
            await _next_binary(ws)
        assert started["session"] in {s.id for s in engine.sessions}
        ws.transport.abort()  # no close frame: the client just vanishes
        gone = time.monotonic()
        ticks = engine.ticks
        while started["session"] in {s.id for s in engine.sessions}:
            await asyncio.sleep(0.002)
        freed_after, ticks_after = time.monotonic() - gone, engine.ticks - ticks
        assert server.server.manager.reserved == 1  # only the witness
        await asyncio.sleep(0.5)
        stop.set()
        await task
        witness.check(since, timing)
        return freed_after, ticks_after

    freed_after, ticks = run(main())
    print(f"slot freed {freed_after * 1000:.0f} ms after the client vanished ({ticks} engine ticks)")
    # the next tick (one in flight at most)
    timing.check(ticks <= 2 and freed_after < 0.25, f"slot freed after {ticks} ticks, {freed_after * 1000:.0f} ms")
    timing.verdict()


def test_several_engines_place_sessions_on_the_emptiest_and_keep_them_there() -> None:
    """`npc-voice serve --devices cpu,cpu`: two engines (model copies) in one server; each new session
    goes to the engine with the most free slots, a hot swap stays on its engine, /health has the
    totals and each engine's figures."""
    from conftest import serve_child

    def used(doc: dict) -> list[int]:
        return [e["slots"]["used"] for e in doc["engines"]]

    with serve_child("--devices", "cpu,cpu", "--slots", "2", "--threads", "1") as (port, get_health):
        doc = get_health()
        assert [e["device"] for e in doc["engines"]] == ["cpu", "cpu"] and doc["slots"]["total"] == 4

        async def main() -> None:
            clients = [NPCVoiceClient(f"ws://127.0.0.1:{port}") for _ in range(5)]
            for c in clients:
                await c.connect()
            a = await clients[0].start("innkeeper")
            assert used(get_health()) == [1, 0]
            b = await clients[1].start("innkeeper")
            assert used(get_health()) == [1, 1]  # the emptier engine
            await b.switch("blacksmith")  # hot swap: stays on engine 1
            doc = get_health()
            assert used(doc) == [1, 1] and [e["engine_sessions"] for e in doc["engines"]] == [1, 1]
            assert [e["sessions"] for e in doc["engines"]] == [1, 1]
            await a.end()
            await asyncio.sleep(0.3)  # a close applies at the engine's next tick
            await clients[2].start("blacksmith")
            assert used(get_health()) == [1, 1]  # engine 0 had the free slots
            await clients[3].start("innkeeper")
            await clients[0].start("innkeeper")
            doc = get_health()
            assert used(doc) == [2, 2] and doc["slots"] == {"total": 4, "used": 4, "free": 0}
            assert doc["engine_sessions"] == 4 and doc["totals"]["sessions"] == 5
            with pytest.raises(NPCVoiceError) as info:
                await clients[4].start("innkeeper")
            assert info.value.code == "server_busy"
            for c in clients:
                await c.close()

        run(main())
