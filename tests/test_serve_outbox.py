"""npc_voice/serve/outbox.py: the bounded queue between the engine thread and a connection's sender,
without sockets, then a real server whose client stops reading (docs/protocol.md)."""

from __future__ import annotations

import asyncio
import json
import socket

import numpy as np

from npc_voice.client import inline_character
from npc_voice.protocol import decode_audio_frame
from npc_voice.serve.outbox import Outbox
from serve_helpers import expect, make_server, run, tone
from serve_helpers import model, cache, store  # noqa: F401 (fixtures)


def test_outbox_is_bounded_and_drops_oldest_audio() -> None:
    async def main() -> None:
        class Link:
            dropped_output = 0

        box, link = Outbox(asyncio.get_running_loop(), max_audio=5, max_json=4), Link()
        box.put_json("started")
        for i in range(12):
            box.put_audio(link, i, np.zeros(4, np.float32))
        for i in range(6):
            box.put_json(f"text {i}")
        assert link.dropped_output == 7 and box.dropped_audio == 7 and box.dropped_json == 3
        assert box.audio_frames == 5 and len(box) == 9
        items = [box.pop() for _ in range(len(box))]
        assert [it[2] for it in items if it[0] == "audio"] == [7, 8, 9, 10, 11]  # the newest audio is kept
        assert [it[1] for it in items if it[0] == "json"] == ["text 2", "text 3", "text 4", "text 5"]
        assert box.pop() is None

    run(main())


def test_slow_reader_loses_oldest_audio_and_is_told(model, cache, store) -> None:
    """A client that stops reading: the server keeps at most `out_audio_frames` queued, drops the
    oldest, and reports the count (a `dropped` message and gaps in the frame index)."""
    from websockets.asyncio.client import connect

    bg = make_server(model, cache, store, slots=1, out_audio_frames=5, dropped_report_s=0.2, send_buffer_bytes=4096,
                     write_limit=4096)
    try:
        async def main() -> None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", bg.server.port))
            ws = await connect(bg.url, sock=sock, compression=None, max_queue=1)
            await expect(ws, "hello")
            await ws.send(json.dumps({"type": "start", "character": inline_character(
                "You are a ferryman.", tone(2.2, 160))}))
            await expect(ws, "started")
            conn = next(iter(bg.server.manager.connections))
            worst = 0
            for _ in range(60):  # 3 s without reading (the socket buffers fill, then the outbox)
                await ws.send(np.zeros(1920, np.int16).tobytes())
                worst = max(worst, conn.outbox.audio_frames)
                await asyncio.sleep(0.05)
            assert worst <= 5
            indexes, dropped = [], None
            while dropped is None or len(indexes) < 40:
                data = await asyncio.wait_for(ws.recv(), 5)
                if isinstance(data, bytes):
                    indexes.append(decode_audio_frame(data)[0])
                elif json.loads(data)["type"] == "dropped":
                    dropped = json.loads(data)
            assert dropped["output_frames"] > 0 and dropped["total_output_frames"] >= dropped["output_frames"]
            gaps = sum(b - a - 1 for a, b in zip(indexes, indexes[1:]))
            assert gaps > 0 and indexes == sorted(indexes)
            await ws.send('{"type": "end"}')
            ended = await expect(ws, "ended")
            assert ended["dropped_output_frames"] >= dropped["total_output_frames"]
            await ws.close()

        run(main())
    finally:
        bg.stop()
