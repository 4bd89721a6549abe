"""Load benchmark of `npc-voice serve`: the most conversations held at real time.

Starts `npc-voice serve` (or uses a running server with --url), then adds conversations step by step
(--steps), each a real websocket client streaming real-time audio and reading its NPC's frames. At
each step it measures, over --seconds, every session's received frame rate (frames / (seconds /
0.08 s)), the audio dropped either way, and the engine's tick time and overruns (from /health).
A step holds real time when every session gets at least --threshold of real time and nothing was
dropped. It stops after the first step that does not hold.

    python tools/bench_server.py --steps 1 2 4 6 8 10 12 --seconds 10            # tiny model, CPU
    python tools/bench_server.py --weights DIR --device cuda --steps 8 16 32 48 64   # the real model

The clients run in this process: on a small CPU machine they take some of its time too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from npc_voice.client import AudioFrame, Dropped, NPCVoiceClient, inline_character  # noqa: E402
from npc_voice.protocol import FRAME_SECONDS, MODEL_RATE, frame_samples


class Conversation:
    def __init__(self, url: str, character, token: str | None):
        self.url, self.character, self.token = url, character, token
        self.arrivals: list[float] = []
        self.dropped_in = self.dropped_out = 0
        self.ready = asyncio.Event()
        self.stop = asyncio.Event()
        self.error: BaseException | None = None

    async def run(self) -> None:
        try:
            async with NPCVoiceClient(self.url, token=self.token) as client:
                session = await client.start(self.character)
                self.ready.set()

                async def feed() -> None:
                    t0, i = time.monotonic(), 0
                    silence = np.zeros(frame_samples(MODEL_RATE), np.int16)
                    while not self.stop.is_set():
                        await session.send_audio(silence)
                        i += 1
                        await asyncio.sleep(max(0.0, t0 + i * FRAME_SECONDS - time.monotonic()))

                feeder = asyncio.create_task(feed())
                async for event in session.events():
                    if isinstance(event, AudioFrame):
                        self.arrivals.append(time.monotonic())
                    elif isinstance(event, Dropped):
                        self.dropped_in, self.dropped_out = event.total_input_frames, event.total_output_frames
                    if self.stop.is_set():
                        break
                feeder.cancel()
                await session.end()
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            self.error = exc
            self.ready.set()

    def frames_between(self, t0: float, t1: float) -> int:
        return sum(1 for t in self.arrivals if t0 <= t < t1)


def get_health(base: str) -> dict:
    with urllib.request.urlopen(f"{base}/health", timeout=10) as r:
        return json.load(r)


def characters(args: argparse.Namespace) -> list:
    """The shipped cast (different characters), then inline ones with distinct voices."""
    cast = []
    folder = Path(args.characters) if args.characters else REPO / "characters"
    if folder.is_dir() and not args.url:
        cast = sorted(p.name for p in folder.iterdir() if (p / "character.toml").is_file())
    rate = MODEL_RATE
    t = np.arange(int(3.0 * rate)) / rate
    extra = [inline_character(f"You are traveller number {i} on the king's road. You talk about the weather.",
                              (0.3 * np.sin(2 * np.pi * (140 + 13 * i) * t)).astype(np.float32), name=f"Traveller {i}")
             for i in range(max(args.steps))]
    return cast + extra


async def measure(args: argparse.Namespace, url: str, base: str, cast: list, live: list[Conversation],
                  tasks: list[asyncio.Task], target: int) -> dict:
    """Adds conversations up to `target`, then measures one step."""
    while len(live) < target:
        conv = Conversation(url, cast[len(live) % len(cast)], args.token)
        live.append(conv)
        tasks.append(asyncio.create_task(conv.run()))
        await conv.ready.wait()
        if conv.error is not None:
            raise SystemExit(f"session {len(live)} failed to start: {conv.error!r}")
    await asyncio.sleep(args.settle)
    before = get_health(base)
    drops_before = [(c.dropped_in, c.dropped_out) for c in live]
    t0 = time.monotonic()
    await asyncio.sleep(args.seconds)
    t1 = time.monotonic()
    after = get_health(base)
    expected = (t1 - t0) / FRAME_SECONDS
    rates = [c.frames_between(t0, t1) / expected for c in live]
    dropped_in = sum(c.dropped_in - d[0] for c, d in zip(live, drops_before))
    dropped_out = sum(c.dropped_out - d[1] for c, d in zip(live, drops_before))
    row = {"sessions": target, "slots": after["slots"]["total"], "rate_min": round(min(rates), 4),
           "rate_mean": round(sum(rates) / len(rates), 4),
           "tick_p50_ms": after["tick_ms"]["p50"], "tick_p99_ms": after["tick_ms"]["p99"],
           "overruns": after["overruns"] - before["overruns"], "ticks": after["ticks"] - before["ticks"],
           "dropped_input_frames": dropped_in, "dropped_output_frames": dropped_out}
    row["real_time"] = row["rate_min"] >= args.threshold and dropped_in == 0 and dropped_out == 0
    return row


async def close_all(live: list[Conversation], tasks: list[asyncio.Task]) -> None:
    for conv in live:
        conv.stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    live.clear()
    tasks.clear()


def print_row(args: argparse.Namespace, row: dict) -> None:
    print(json.dumps(row) if args.json else
          f"{row['sessions']:>8} {row['slots']:>5} {row['rate_min']:>8.3f} {row['rate_mean']:>9.3f} "
          f"{row['tick_p50_ms']:>7.1f}ms {row['tick_p99_ms']:>7.1f}ms {row['overruns']:>5}/{row['ticks']:<5} "
          f"{row['dropped_input_frames']:>5}/{row['dropped_output_frames']:<5} {'yes' if row['real_time'] else 'NO'}",
          flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count()


class Server:
    """`npc-voice serve` with `slots` slots, as a child process (prompts cached on disk between steps)."""

    def __init__(self, args: argparse.Namespace, slots: int, cache_dir: str):
        self.port = free_port()
        devices = ["--devices", args.devices] if args.devices else []
        if args.devices:  # --slots is per device: N conversations over D devices need ceil(N / D) each
            count = len(args.devices.split(",")) if args.devices != "all" else _cuda_count()
            slots = -(-slots // max(1, count))
        cmd = [sys.executable, "-m", "npc_voice.cli", "serve", "--port", str(self.port), "--slots", str(slots), *devices,
               "--threads", str(args.threads), "--log-level", "WARNING", "--prefix-cache", cache_dir,
               "--characters", args.characters or str(REPO / "characters"), *args.serve_args]
        path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)  # keep the caller's
        self.proc = subprocess.Popen(cmd, env=os.environ | {"PYTHONPATH": path})
        self.url, self.base = f"ws://127.0.0.1:{self.port}/ws", f"http://127.0.0.1:{self.port}"

    def wait(self) -> dict:
        deadline = time.monotonic() + 300
        while True:
            try:
                return get_health(self.base)
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the server did not come up")
                time.sleep(0.3)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a running server (ws://host:port/ws): sessions are added to it step by step; "
                   "default: start `npc-voice serve --slots N` for each step N")
    p.add_argument("--token")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 6, 8, 10, 12])
    p.add_argument("--seconds", type=float, default=10.0, help="measured time per step")
    p.add_argument("--settle", type=float, default=2.0, help="seconds after the last session started")
    p.add_argument("--threshold", type=float, default=0.98, help="least share of real time every session must get")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the server it starts")
    p.add_argument("--characters", help="characters folder of the server it starts (default: the shipped cast)")
    p.add_argument("--devices", help="passed to the server it starts (`npc-voice serve --devices`, e.g. cuda:0,cuda:1 "
                   "or all): one engine per device, each step's conversations spread over them")
    p.add_argument("--json", action="store_true")
    p.add_argument("serve_args", nargs="*", help="after --: more `npc-voice serve` options (--weights, --device ...)")
    args = p.parse_args(argv)
    cast = characters(args)

    async def run() -> list[dict]:
        rows: list[dict] = []
        live: list[Conversation] = []
        tasks: list[asyncio.Task] = []
        header = False
        with tempfile.TemporaryDirectory() as cache_dir:
            for target in args.steps:
                server = None
                if args.url:
                    url, base = args.url, args.url.replace("ws", "http", 1).rsplit("/ws", 1)[0]
                else:
                    server = Server(args, target, cache_dir)
                    url, base = server.url, server.base
                try:
                    health = server.wait() if server else get_health(base)
                    if not header:
                        header = True
                        print(f"# server: model {health['model']} ({health['weights']} weights) on {health['device']}, "
                              f"{health['dtype']}; {args.seconds:g} s per step, threshold {args.threshold:g} of real "
                              f"time; {'sessions added to ' + url if args.url else 'a fresh server per step, --slots = sessions'}",
                              flush=True)
                        if not args.json:
                            print(f"{'sessions':>8} {'slots':>5} {'rate min':>8} {'rate mean':>9} {'tick p50':>9} "
                                  f"{'tick p99':>9} {'overruns':>11} {'dropped in/out':>14} real time")
                    row = await measure(args, url, base, cast, live, tasks, target)
                finally:
                    if server is not None:
                        await close_all(live, tasks)
                        server.stop()
                rows.append(row)
                print_row(args, row)
                if not row["real_time"]:
                    break
            await close_all(live, tasks)
        return rows

    rows = asyncio.run(run())
    held = [r["sessions"] for r in rows if r["real_time"]]
    print(f"# most sessions held at real time: {max(held) if held else 0}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
