"""A Realtime session (/v1/realtime, the official openai SDK) against a native one (/ws, npc_voice.client):
the same number of sessions streaming real-time audio for the same time on a fresh `npc-voice serve`
(tiny model unless told otherwise); prints the engine's tick times (/health) and the server process's
CPU seconds per session-second for each kind (docs/performance.md, "Realtime endpoint").

    python tools/bench_realtime.py --sessions 4 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np

from npc_voice.protocol import FRAME_SECONDS, MODEL_RATE, frame_samples

CHUNK = np.zeros(frame_samples(MODEL_RATE), np.int16)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def native(port: int, seconds: float, character: str) -> int:
    from npc_voice.client import AudioFrame, NPCVoiceClient

    async with NPCVoiceClient(f"ws://127.0.0.1:{port}/ws") as client:
        session = await client.start(character)
        frames, t0 = 0, time.monotonic()

        async def feed() -> None:
            i = 0
            while True:
                await session.send_audio(CHUNK)
                i += 1
                await asyncio.sleep(max(0.0, t0 + i * FRAME_SECONDS - time.monotonic()))

        feeder = asyncio.create_task(feed())
        async for ev in session.events():
            frames += isinstance(ev, AudioFrame)
            if time.monotonic() - t0 >= seconds:
                break
        feeder.cancel()
        await session.end()
        return frames


async def realtime(port: int, seconds: float, character: str) -> int:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
    audio = base64.b64encode(CHUNK.astype("<i2").tobytes()).decode()
    async with client.realtime.connect(model=character) as conn:
        frames, t0 = 0, time.monotonic()

        async def feed() -> None:
            i = 0
            while True:
                await conn.input_audio_buffer.append(audio=audio)
                i += 1
                await asyncio.sleep(max(0.0, t0 + i * FRAME_SECONDS - time.monotonic()))

        feeder = asyncio.create_task(feed())
        while time.monotonic() - t0 < seconds:
            ev = await conn.recv()
            frames += ev.type == "response.output_audio.delta"
        feeder.cancel()
        return frames


def health(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
        return json.load(r)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sessions", type=int, default=4)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--character", default="innkeeper")
    p.add_argument("serve_args", nargs="*", help="after --: more `npc-voice serve` options")
    args = p.parse_args(argv)
    rows = []
    for kind, run in (("native /ws", native), ("realtime /v1/realtime", realtime)):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = subprocess.Popen([sys.executable, "-m", "npc_voice.cli", "serve", "--port", str(port), "--threads", "1",
                                 "--slots", str(args.sessions), "--log-level", "WARNING", *args.serve_args])
        try:
            while True:
                try:
                    health(port)
                    break
                except OSError:
                    time.sleep(0.2)

            async def go() -> list[int]:
                await run(port, 1.0, args.character)  # builds the character once: not measured
                return await asyncio.gather(*(run(port, args.seconds, args.character) for _ in range(args.sessions)))

            cpu0, ticks0 = cpu_seconds(proc.pid), health(port)["ticks"]
            frames = asyncio.run(go())
            doc, cpu1 = health(port), cpu_seconds(proc.pid)
        finally:
            proc.terminate()
            proc.wait(20)
        rows.append({"kind": kind, "sessions": args.sessions, "frames_per_session": min(frames),
                     "tick_p50_ms": doc["tick_ms"]["p50"], "tick_p99_ms": doc["tick_ms"]["p99"],
                     "ticks": doc["ticks"] - ticks0, "overruns": doc["overruns"],
                     "server_cpu_s_per_session_s": round((cpu1 - cpu0) / (args.sessions * args.seconds), 3)})
    print("| kind | sessions | frames/session | tick p50 ms | tick p99 ms | overruns | server CPU s per session-s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kind']} | {r['sessions']} | {r['frames_per_session']} | {r['tick_p50_ms']} | {r['tick_p99_ms']} "
              f"| {r['overruns']} | {r['server_cpu_s_per_session_s']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
