"""Visemes end to end: a real `npc-voice serve` (tiny model) and the Python client
(npc_voice.client): the mouth track arrives before each audio frame; `--no-visemes` refuses it."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import serve_child, stream_silence  # noqa: E402

from npc_voice.client import AudioFrame, NPCVoiceClient, NPCVoiceError, Visemes  # noqa: E402

CAST = Path(__file__).resolve().parent.parent / "characters"


def test_the_client_gets_visemes_before_each_frame_and_a_no_visemes_server_refuses() -> None:
    async def talk(port: int) -> list:
        async with NPCVoiceClient(f"ws://127.0.0.1:{port}") as client:
            session = await client.start("innkeeper", visemes=True, seed=3)
            feeder = asyncio.create_task(stream_silence(session))
            await session.say("Welcome to the Gilded Stag, traveller!")
            events = []
            async for event in session.events():
                if isinstance(event, (AudioFrame, Visemes)):
                    events.append(event)
                if sum(isinstance(e, AudioFrame) for e in events) >= 40:
                    break
            feeder.cancel()
            await session.end()
            return events

    async def refused(port: int) -> str:
        async with NPCVoiceClient(f"ws://127.0.0.1:{port}") as client:
            with pytest.raises(NPCVoiceError) as err:
                await client.start("innkeeper", visemes=True)
            session = await client.start("innkeeper")  # without them it starts
            await session.end()
            return err.value.code

    args = ("--slots", "1", "--threads", "1", "--characters", str(CAST), "--log-level", "WARNING")
    with serve_child(*args) as (port, _):
        events = asyncio.run(asyncio.wait_for(talk(port), 120))
    frames = [e for e in events if isinstance(e, AudioFrame)]
    assert len(frames) >= 40
    for k, event in enumerate(events):
        if isinstance(event, AudioFrame):
            before = events[k - 1]
            assert isinstance(before, Visemes) and before.frame == event.frame  # just before its frame
            assert before.step_ms == 20 and len(before.jaw) == len(before.visemes) == 4
    jaw = np.array([j for e in events if isinstance(e, Visemes) for j in e.jaw])
    assert np.all((jaw >= 0) & (jaw <= 1)) and jaw.max() > 0  # the NPC's mouth moved
    with serve_child(*args, "--no-visemes") as (port, _):
        assert asyncio.run(asyncio.wait_for(refused(port), 120)) == "visemes_unavailable"
