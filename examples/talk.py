#!/usr/bin/env python3
"""The smallest complete npc-voice client, with raw `websockets` (the protocol: docs/protocol.md).

    python examples/talk.py --input me.wav --output npc.wav --character innkeeper --server ws://127.0.0.1:8765
    python examples/talk.py --character blacksmith          # microphone to speaker (pygame/SDL audio), Ctrl-C ends
"""

import argparse, asyncio, collections, json, struct, sys  # noqa: E401

import numpy as np

# Standalone on purpose (raw websockets, no npc_voice import), so it states the protocol's numbers
# itself (docs/protocol.md); tests/test_shared_facts.py checks they agree with npc_voice.protocol.
RATE, FRAME = 24_000, 1920  # the session's rate and the server's 80 ms frame (samples)


async def talk(args: argparse.Namespace) -> None:
    import websockets

    url = args.server.rstrip("/") + ("" if args.server.rstrip("/").endswith("/ws") else "/ws")
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else None
    async with websockets.connect(url, additional_headers=headers, max_size=4 << 20) as ws:
        hello = json.loads(await ws.recv())  # {"type": "hello", "protocol": 1, ...}
        await ws.send(json.dumps({"type": "start", "character": args.character, "sample_rate": RATE, "protocol": 1}))
        started = json.loads(await ws.recv())  # "started" once the NPC's first frame is ready, or "error"
        if started["type"] != "started":
            sys.exit(f"refused: {started}")
        print(f"{hello['server']}: session {started['session']} with {started['character']}", file=sys.stderr)
        mic_queue: asyncio.Queue = asyncio.Queue()
        out: dict[int, np.ndarray] = {}  # NPC frames by index (a missing index is silence)
        play: collections.deque = collections.deque()  # frames for the speaker (microphone mode)

        if args.input:  # the player's side from a file, resampled to 24 kHz mono
            import soundfile, soxr
            samples, rate = soundfile.read(args.input, dtype="float32", always_2d=True)
            pcm = (np.clip(soxr.resample(samples.mean(axis=1), rate, RATE), -1, 1) * 32767).astype("<i2")
            chunks = [pcm[i:i + FRAME] for i in range(0, len(pcm), FRAME)]
        else:
            devices = open_audio(mic_queue, asyncio.get_running_loop(), play)  # noqa: F841 (kept open)

        async def send() -> None:  # the player's audio as binary frames, in real time; then "end"
            if not args.input:
                while True:  # the microphone paces itself (and sends its silence too)
                    await ws.send((await mic_queue.get()).tobytes())
            clock = asyncio.get_running_loop().time
            t0 = clock()
            for i, chunk in enumerate(chunks):  # 80 ms every 80 ms: faster than real time would be dropped
                await ws.send(chunk.tobytes())
                await asyncio.sleep(max(0.0, t0 + (i + 1) * FRAME / RATE - clock()))
            await ws.send(json.dumps({"type": "end"}))

        sender = asyncio.create_task(send())
        try:
            async for data in ws:
                if isinstance(data, bytes):  # [uint32 LE frame index][1920 x PCM16 LE]
                    (index,) = struct.unpack_from("<I", data)
                    out[index] = np.frombuffer(data, "<i2", offset=4)
                    if not args.input:
                        play.append(out[index])
                    continue
                msg = json.loads(data)
                if msg["type"] == "text":
                    print(msg["text"], end="", flush=True)  # subtitles: pieces, a leading space starts a word
                elif msg["type"] == "state":
                    print(f" [{msg['state']}]", end="", file=sys.stderr, flush=True)
                elif msg["type"] == "error":
                    print(f"\nerror: {msg}", file=sys.stderr)
                elif msg["type"] == "ended":
                    print(f"\nended: {msg['reason']}, {msg['frames']} frames", file=sys.stderr)
                    break
        finally:
            sender.cancel()
        if args.output:
            import soundfile
            n = max(out, default=-1) + 1
            pcm = np.zeros(n * FRAME, "<i2")
            for index, frame in out.items():
                pcm[index * FRAME:(index + 1) * FRAME] = frame
            soundfile.write(args.output, pcm, RATE, subtype="PCM_16")
            print(f"wrote {args.output} ({n * FRAME / RATE:.2f} s)", file=sys.stderr)


def open_audio(mic_queue: asyncio.Queue, loop: asyncio.AbstractEventLoop, play: collections.deque) -> list:
    """Microphone and speaker through SDL (pygame): captured chunks go to `mic_queue`, frames in
    `play` are played in arrival order (silence when none is waiting)."""
    import pygame
    from pygame._sdl2 import audio as sdl
    pygame.init()
    pending = bytearray()

    def captured(_dev, mem) -> None:  # SDL's audio thread: hand the chunk to the event loop
        loop.call_soon_threadsafe(mic_queue.put_nowait, np.frombuffer(bytes(mem), "<i2").copy())

    def playback(_dev, mem) -> None:  # SDL's audio thread asks for len(mem) bytes
        while len(pending) < len(mem) and play:
            pending.extend(play.popleft().tobytes())
        n = min(len(pending), len(mem))
        mem[:n], mem[n:] = pending[:n], bytes(len(mem) - n)
        del pending[:n]

    devices = []
    for capture, callback in ((True, captured), (False, playback)):
        names = sdl.get_audio_device_names(capture)
        if not names:
            sys.exit(f"no audio {'capture' if capture else 'output'} device: use --input/--output")
        try:
            devices.append(sdl.AudioDevice(names[0], capture, RATE, sdl.AUDIO_S16, 1, 1024, 0, callback))
        except Exception as exc:  # pygame._sdl2 error: busy or missing device
            sys.exit(f"cannot open {names[0]!r}: {exc} (use --input/--output)")
    for device in devices:
        device.pause(0)
    return devices


def main() -> None:
    p = argparse.ArgumentParser(description="talk to an npc-voice NPC: a WAV in and out, or mic and speaker")
    p.add_argument("--server", default="ws://127.0.0.1:8765")
    p.add_argument("--token", help="the server's token, if it has one")
    p.add_argument("--character", default="innkeeper")
    p.add_argument("--input", help="the player's side (WAV/FLAC/OGG); without it: the microphone")
    p.add_argument("--output", help="the NPC's side, 24 kHz mono WAV (frames placed by their index)")
    try:
        asyncio.run(talk(p.parse_args()))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
