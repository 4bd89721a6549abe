"""npc_voice/serve/connection.py on the real server with real websocket clients (`tiny` model):
a conversation with say and switch, the client's rates, bad and hostile input answered with its
error code, faults that are not a close, long roles, and the idle timeout (docs/protocol.md)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import numpy as np
import pytest

from npc_voice.client import AudioFrame, NPCVoiceClient, inline_character
from npc_voice.engine import Engine
from npc_voice.model.loading import random_model
from npc_voice.protocol import Dropped, ErrorMsg, State, Switched, Text, decode_audio_frame, frame_samples
from npc_voice.serve import BackgroundServer, ServerConfig
from serve_helpers import (
    REPO, Witness, _next_binary, collect_until, expect, health, make_server, recv_json, run, tone, wait_idle,
)
from serve_helpers import model, cache, store, server  # noqa: F401 (fixtures)


def test_conversation_say_and_switch(server: BackgroundServer) -> None:
    wait_idle(server)

    async def main() -> None:
        async with NPCVoiceClient(server.url) as client:
            assert client.hello.protocol == 1 and 24_000 in client.hello.sample_rates
            session = await client.start("innkeeper", seed=5)
            assert session.id and session.character == "innkeeper"
            assert session.sample_rate == 24_000 and session.frame_samples == 1920
            events: list = []
            await collect_until(lambda e: isinstance(e, AudioFrame) and e.frame >= 5, events)(session)
            await session.say("Welcome to the Gilded Stag!")
            await collect_until(lambda e: isinstance(e, AudioFrame) and e.frame >= 5 + 3 * 14, events)(session)
            switched = await session.switch("blacksmith")
            assert switched.character == "blacksmith" and switched.frame > 5
            await collect_until(lambda e: isinstance(e, AudioFrame) and e.frame >= switched.frame + 5, events)(session)
            ended = await session.end()
            assert ended.reason == "client" and ended.frames >= switched.frame + 6 and ended.dropped_output_frames == 0

            audio = [e for e in events if isinstance(e, AudioFrame)]
            assert [a.frame for a in audio] == list(range(len(audio)))  # one counter across the switch
            assert all(a.pcm.shape == (1920,) and a.pcm.dtype == np.int16 for a in audio)
            texts = [e for e in events if isinstance(e, Text)]
            assert all(abs(t.time - 0.08 * t.frame) < 1e-6 for t in texts)
            spoken = "".join(t.text for t in texts)
            assert "Welcome to the Gilded Stag!" in spoken, spoken
            assert any(isinstance(e, Switched) and e.frame == switched.frame for e in events)
            assert any(isinstance(e, State) and e.state == "speaking" for e in events)

    run(main())
    assert health(server)["totals"]["sessions"] >= 1


@pytest.mark.parametrize("rate", [16_000, 48_000])
def test_client_rates(server: BackgroundServer, rate: int) -> None:
    wait_idle(server)
    character = inline_character("You sell apples at the market.", tone(2.2, 230), name="Apple seller")

    async def main() -> None:
        async with NPCVoiceClient(server.url) as client:
            session = await client.start(character, sample_rate=rate)
            assert session.frame_samples == frame_samples(rate)
            chunk = (tone(0.031, 300, rate) * 32767).astype(np.int16)  # odd-sized chunks: the server re-frames
            frames = []
            while len(frames) < 15:
                await session.send_audio(chunk)
                event = await session.next_event(timeout=5)
                if isinstance(event, AudioFrame):
                    frames.append(event)
                assert not isinstance(event, (ErrorMsg, Dropped)), event
            assert all(f.pcm.shape == (frame_samples(rate),) for f in frames)
            ended = await session.end()
            assert ended.dropped_input_frames == 0

    run(main())


@pytest.mark.realtime
def test_bad_input_gets_its_error_code_and_others_carry_on(server: BackgroundServer, timing) -> None:
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosedError

    wait_idle(server)
    limits = server.server.config.limits

    async def main() -> None:
        stop = asyncio.Event()
        witness = Witness(server.url)
        task = asyncio.create_task(witness.run(stop))
        await asyncio.wait_for(witness.ready.wait(), 30)
        await asyncio.sleep(0.3)
        since = time.monotonic()
        async with connect(server.url, compression=None) as ws:
            await expect(ws, "hello", protocol=1)
            await ws.send("{this is not json")
            await expect(ws, "error", "bad_json", fatal=False)
            await ws.send('{"type": "fly", "ref": 1}')
            await expect(ws, "error", "unknown_type", ref=1)
            await ws.send('{"type": "start", "character": 42}')
            await expect(ws, "error", "invalid_message")
            await ws.send(np.zeros(1920, np.int16).tobytes())
            await expect(ws, "error", "no_session")
            await ws.send('{"type": "say", "text": "hello"}')
            await expect(ws, "error", "no_session")
            await ws.send('{"type": "start", "character": "nobody-here", "ref": "a"}')
            await expect(ws, "error", "unknown_character", ref="a")
            await ws.send('{"type": "start", "character": "../../etc/passwd"}')
            await expect(ws, "error", "unknown_character")
            await ws.send('{"type": "start", "character": "innkeeper", "protocol": 3}')
            await expect(ws, "error", "unsupported_version")
            # still usable: a real session on the same connection
            await ws.send('{"type": "start", "character": "innkeeper", "ref": "go"}')
            started = await expect(ws, "started", ref="go")
            await ws.send('{"type": "start", "character": "innkeeper"}')
            await expect(ws, "error", "session_active")
            await ws.send(b"\x01\x02\x03")
            await expect(ws, "error", "bad_audio")
            await ws.send(b"\x00" * (limits.max_audio_bytes + 2))
            await expect(ws, "error", "message_too_large")
            await ws.send(json.dumps({"type": "say", "text": "x" * (limits.max_say_chars + 1)}))
            await expect(ws, "error", "invalid_message")
            for _ in range(3):  # the session goes on after every refusal
                frame, pcm = decode_audio_frame(await asyncio.wait_for(
                    _next_binary(ws), 5))
                assert pcm.size == 1920
            await ws.send('{"type": "end"}')
            ended = await expect(ws, "ended", session=started["session"], reason="client")
            assert ended["frames"] >= 3
        # over the transport limit: the websocket layer closes with 1009 (message too big)
        # The server closes while this client may still be writing the message. On this client's side
        # asyncio can then fail to abort its already-lost transport (AttributeError in the selector
        # transport, when the send or the close races the peer's close): the close frame the server
        # sent is what counts.
        ws = await connect(server.url, compression=None, max_size=None)
        try:
            await expect(ws, "hello")
            with contextlib.suppress(ConnectionClosedError, AttributeError):
                await ws.send(b"\x00" * (limits.max_message_bytes + 2))
                await recv_json(ws)
            await asyncio.wait_for(ws.wait_closed(), 10)
            assert ws.protocol.close_rcvd is not None and ws.protocol.close_rcvd.code == 1009
        finally:
            with contextlib.suppress(AttributeError):
                await ws.close()
        await asyncio.sleep(0.5)
        stop.set()
        await task
        witness.check(since, timing)

    run(main())
    timing.verdict()


def test_hostile_json_gets_its_code_and_the_connection_goes_on(server: BackgroundServer) -> None:
    """Deep nesting, a 5000-digit seed and wrongly typed fields are answered with their error codes
    (they closed the connection with 1011 before); the same connection then starts and ends a session."""
    from websockets.asyncio.client import connect

    wait_idle(server)

    async def main() -> None:
        async with connect(server.url, compression=None) as ws:
            await expect(ws, "hello")
            await ws.send("[" * 100_000 + "]" * 100_000)
            await expect(ws, "error", "bad_json", fatal=False)
            await ws.send('{"type": "start", "character": "innkeeper", "ref": 5, "x": ' + "{" * 100_000)
            await expect(ws, "error", "bad_json", fatal=False)
            await ws.send('{"type": "start", "character": "innkeeper", "seed": ' + "9" * 5000 + ', "ref": "s"}')
            await expect(ws, "error", "invalid_message", fatal=False, ref="s")
            for field, value in (("sample_rate", '"24000"'), ("seed", '"7"'), ("seed", "true"), ("protocol", "1.0")):
                await ws.send(f'{{"type": "start", "character": "innkeeper", "{field}": {value}, "ref": 9}}')
                error = await expect(ws, "error", "invalid_message", ref=9)
                assert field in error["message"], error
            await ws.send('{"type": "start", "character": {"role": "", "voice": {"preset": "NATF2"}}, "ref": 1}')
            await expect(ws, "error", "invalid_character", ref=1)  # as the doc says (was invalid_message)
            await ws.send('{"type": "start", "character": "innkeeper", "seed": 7, "ref": "ok"}')
            started = await expect(ws, "started", ref="ok")
            frame, pcm = decode_audio_frame(await asyncio.wait_for(_next_binary(ws), 10))
            assert frame == 0 and pcm.size == 1920
            await ws.send('{"type": "say", "text": "x", "ref": ' + "1" * 5000 + "}")
            await expect(ws, "error", "invalid_message")
            await ws.send('{"type": "end", "ref": 3}')
            await expect(ws, "ended", session=started["session"], reason="client", ref=3)

    run(main())
    assert health(server)["status"] == "ok"


def test_a_burst_of_mistakes_gets_every_error_while_the_client_reads(server: BackgroundServer) -> None:
    """3000 bad messages sent back to back by a client that reads meanwhile: each is answered with
    its error, in order (the replies were queued faster than the connection sent them, and the
    oldest were dropped); then a session starts and ends on the same connection."""
    from websockets.asyncio.client import connect

    wait_idle(server)
    n = 3000

    async def main() -> None:
        async with connect(server.url, compression=None, max_queue=None) as ws:
            await expect(ws, "hello")

            async def burst() -> None:
                for i in range(n):
                    await ws.send(json.dumps({"type": "strat", "ref": i}))

            sender = asyncio.create_task(burst())
            refs = []
            while len(refs) < n:
                msg = json.loads(await asyncio.wait_for(ws.recv(), 30))
                assert msg["type"] == "error" and msg["code"] == "unknown_type", msg
                refs.append(msg["ref"])
            await sender
            assert refs == list(range(n))
            await ws.send('{"type": "start", "character": "innkeeper", "ref": "ok"}')
            started = await expect(ws, "started", ref="ok")
            await ws.send('{"type": "end", "ref": 3}')
            await expect(ws, "ended", session=started["session"], reason="client", ref=3)

    run(main())


def test_invalid_utf8_text_closes_with_1007_as_documented(server: BackgroundServer) -> None:
    """RFC 6455 makes a text frame that is not UTF-8 fail the connection: the websocket library
    closes it with 1007 before the server sees the message (docs/protocol.md lists the code). Only
    that connection: the session on another one goes on."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosedError

    wait_idle(server)
    assert "1007" in (REPO / "docs" / "protocol.md").read_text()

    async def main() -> None:
        async with connect(server.url, compression=None) as other:
            await expect(other, "hello")
            await other.send('{"type": "start", "character": "innkeeper"}')
            await expect(other, "started")
            async with connect(server.url, compression=None) as ws:
                await expect(ws, "hello")
                with pytest.raises(ConnectionClosedError) as info:
                    await ws.send(b'{"type": "say", "text": "\xff\xfe"}', text=True)
                    await recv_json(ws)
                assert info.value.rcvd is not None and info.value.rcvd.code == 1007
            frames = [decode_audio_frame(await asyncio.wait_for(_next_binary(other), 10))[0] for _ in range(3)]
            assert frames == sorted(frames) and len(set(frames)) == 3
            await other.send('{"type": "end"}')
            await expect(other, "ended", reason="client")

    run(main())


def test_role_longer_than_a_short_context_starts_and_speaks(store) -> None:
    """`--context 16`: a role whose prompt is many times the context (it closed the connection with
    1011 before the engine accepted such prompts) starts, speaks a `say` line and ends, over more
    frames than the context, with every frame in order and no error."""
    import dataclasses

    from npc_voice.engine.prompt import text_prompt_tokens
    from npc_voice.model.config import get_preset

    context = 16
    cfg = get_preset("tiny")
    short = random_model(dataclasses.replace(cfg, lm=dataclasses.replace(cfg.lm, context=context)), seed=5)
    assert short.config.lm.context == context
    role = ("You are the ferryman of the black river. You speak little, you ask every traveller for a silver "
            "coin before they board, and you remember every face you have carried across. ") * 4
    assert len(text_prompt_tokens(short, role)) > 4 * context  # the voice's frames come on top
    line = "Pay the ferryman, traveller!"
    bg = BackgroundServer(Engine(short, slots=1), ServerConfig(port=0), store).start()
    try:
        async def main() -> None:
            async with NPCVoiceClient(bg.url) as client:
                session = await client.start(inline_character(role, tone(2.2, 190), name="Ferryman"), seed=3)
                assert session.character == "Ferryman"
                events: list = []
                await collect_until(lambda e: isinstance(e, AudioFrame) and e.frame >= 3, events)(session)
                await session.say(line)
                last = 4 + 3 * 16 + context  # the line's tokens one every third frame, then past the context again
                await collect_until(lambda e: isinstance(e, AudioFrame) and e.frame >= last, events)(session)
                ended = await session.end()
                assert ended.reason == "client" and ended.frames > last > 3 * context
                audio = [e for e in events if isinstance(e, AudioFrame)]
                assert [a.frame for a in audio] == list(range(len(audio)))
                assert all(a.pcm.shape == (1920,) for a in audio)
                assert not [e for e in events if isinstance(e, (ErrorMsg, Dropped))]
                spoken = "".join(e.text for e in events if isinstance(e, Text))
                assert line in spoken, spoken
                # the connection is still open and usable: a second start on it works
                again = await client.start(inline_character(role, tone(2.2, 190), name="Ferryman"))
                await again.end()

        run(main())
        assert health(bg)["status"] == "ok" and bg.server.loop_error is None
        built = list(bg.server.engine.cache._entries.values())  # the prompt the engine built and used
        assert len(built) == 1 and built[0].length > 4 * context and built[0].keys.shape[2] == context
    finally:
        bg.stop()


def test_a_server_fault_on_a_message_is_internal_error_not_1011(server: BackgroundServer, monkeypatch) -> None:
    """A message that trips a bug in the server (here: the engine's `say` raises) is answered with
    `internal_error` (not fatal) instead of closing the connection with 1011; the session goes on."""
    from websockets.asyncio.client import connect

    wait_idle(server)

    def broken_say(session, text):
        raise RuntimeError("a bug in say")

    async def main() -> None:
        async with connect(server.url, compression=None) as ws:
            await expect(ws, "hello")
            await ws.send('{"type": "start", "character": "innkeeper"}')
            started = await expect(ws, "started")
            monkeypatch.setattr(server.server.engine, "say", broken_say)
            await ws.send('{"type": "say", "text": "hello"}')
            error = await expect(ws, "error", "internal_error", fatal=False)
            assert "a bug in say" in error["message"]
            monkeypatch.undo()
            await ws.send('{"type": "say", "text": "hello"}')
            frames = [decode_audio_frame(await asyncio.wait_for(_next_binary(ws), 10))[0] for _ in range(3)]
            assert len(set(frames)) == 3
            await ws.send('{"type": "end", "ref": 1}')
            await expect(ws, "ended", session=started["session"], reason="client", ref=1)

    run(main())


def test_idle_timeout_closes_and_frees_the_slot(model, cache, store) -> None:
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    bg = make_server(model, cache, store, slots=1, idle_timeout=0.6)
    try:
        async def main() -> None:
            async with connect(bg.url, compression=None) as ws:
                await expect(ws, "hello", idle_timeout_s=0.6)
                await ws.send(json.dumps({"type": "start", "character": inline_character(
                    "You are a ferryman.", tone(2.2, 160))}))
                await expect(ws, "started")
                await expect(ws, "error", "idle_timeout", fatal=True)
                await expect(ws, "ended", reason="idle_timeout")
                with pytest.raises(ConnectionClosed):
                    while True:
                        await ws.recv()
                assert ws.close_code == 1008
            assert bg.server.manager.reserved == 0

        run(main())
    finally:
        bg.stop()


def test_idle_timeout_always_sends_ended_before_closing(model, cache, store) -> None:
    """10 tries with a 0.3 s idle timeout, each with a character never built before (its build takes
    about as long as the timeout): the build's time is not the client's idling (nothing is read while a
    start is handled), so every try gets `started`, then `error` idle_timeout and `ended`, then close 1008."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    bg = make_server(model, cache, store, slots=1, idle_timeout=0.3)
    try:
        async def one(i: int) -> tuple[list[str], int | None]:
            seen = []
            async with connect(bg.url, compression=None) as ws:
                await ws.send(json.dumps({"type": "start", "character": inline_character(
                    f"You are ferryman number {i}.", tone(2.2, 150 + 11 * i))}))
                with pytest.raises(ConnectionClosed):
                    while True:
                        message = await ws.recv()
                        if isinstance(message, str):
                            msg = json.loads(message)
                            if msg["type"] not in ("text", "state"):
                                seen.append(f"{msg['type']}:{msg.get('code') or msg.get('reason') or ''}")
                return seen, ws.close_code

        for i in range(10):
            seen, code = run(one(i), timeout=30)
            assert (seen, code) == (["hello:", "started:", "error:idle_timeout", "ended:idle_timeout"], 1008), i
            wait_idle(bg)  # the slot is free again
    finally:
        bg.stop()
