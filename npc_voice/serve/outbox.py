"""The bounded queue between the engine thread and a connection's sender task.

The engine thread never touches a socket: its listener appends to the outbox (the oldest audio
dropped and counted when a client reads too slowly) and wakes the event loop with
`call_soon_threadsafe`, at most one pending wake-up per connection, so nothing grows without bound
and no client can delay a tick.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from typing import Any

import numpy as np


class Outbox:
    """What a connection will send, in order: JSON messages and NPC audio frames.

    Filled from any thread (the engine thread's listener, the event loop), emptied by the
    connection's sender task. Bounded: beyond `max_audio` audio frames the oldest frame is dropped
    (counted on its session link), beyond `max_json` JSON messages the oldest message is. Wakes the
    event loop with `call_soon_threadsafe`, with at most one wake-up pending."""

    def __init__(self, loop: asyncio.AbstractEventLoop, max_audio: int, max_json: int):
        self.loop, self.max_audio, self.max_json = loop, max_audio, max_json
        self._items: collections.deque[tuple[Any, ...]] = collections.deque()
        self._n_audio = self._n_json = 0
        self._lock = threading.Lock()
        self._ready = asyncio.Event()
        self._wake_pending = False
        self.dropped_audio = 0
        self.dropped_json = 0

    def put_json(self, text: str) -> None:
        with self._lock:
            self._items.append(("json", text))
            self._n_json += 1
            while self._n_json > self.max_json:
                self._drop_oldest("json")
                self.dropped_json += 1
            wake = self._arm()
        if wake:
            self._wake()

    @property
    def json_backlog(self) -> int:
        """JSON messages waiting to be sent."""
        with self._lock:
            return self._n_json

    async def json_room(self, is_open: Any) -> None:
        """(event loop) Called after each message a connection handles: gives the sender its turn (a
        burst of messages already received would otherwise be handled back to back, their replies
        piling up), then waits while more than half of `max_json` JSON messages wait to be sent and
        `is_open()`: a connection stops reading a client that sends faster than it reads its replies
        (flow control, as TCP's), instead of dropping replies."""
        await asyncio.sleep(0)
        while self.json_backlog > self.max_json // 2 and is_open():
            await asyncio.sleep(0.005)

    def put_audio(self, link: Any, frame: int, pcm: np.ndarray, before: str | None = None) -> None:
        """`link`: whose `dropped_output` counts this frame if it is dropped (a `LiveSession`);
        `before`: a JSON text sent just before the frame (its visemes), dropped with it."""
        with self._lock:
            self._items.append(("audio", link, frame, pcm, before))
            self._n_audio += 1
            while self._n_audio > self.max_audio:
                dropped = self._drop_oldest("audio")
                dropped[1].dropped_output += 1
                self.dropped_audio += 1
            wake = self._arm()
        if wake:
            self._wake()

    def _drop_oldest(self, kind: str) -> tuple[Any, ...]:
        for i, item in enumerate(self._items):
            if item[0] == kind:
                del self._items[i]
                if kind == "audio":
                    self._n_audio -= 1
                else:
                    self._n_json -= 1
                return item
        raise AssertionError("count and queue disagree")

    def _arm(self) -> bool:
        if self._wake_pending:
            return False
        self._wake_pending = True
        return True

    def _wake(self) -> None:
        try:
            self.loop.call_soon_threadsafe(self._on_wake)
        except RuntimeError:  # the loop is closed: nobody is left to send to
            pass

    def _on_wake(self) -> None:
        with self._lock:
            self._wake_pending = False
        self._ready.set()

    def pop(self) -> tuple[Any, ...] | None:
        """The next item, or None (and the ready flag cleared) when empty. Event loop only."""
        with self._lock:
            if not self._items:
                self._ready.clear()
                return None
            item = self._items.popleft()
            if item[0] == "audio":
                self._n_audio -= 1
            else:
                self._n_json -= 1
            return item

    async def wait(self) -> None:
        await self._ready.wait()

    def kick(self) -> None:
        """Wakes the sender from the event loop (e.g. to close)."""
        self._ready.set()

    def __len__(self) -> int:
        return len(self._items)

    @property
    def audio_frames(self) -> int:
        return self._n_audio
