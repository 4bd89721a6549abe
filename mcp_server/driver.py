"""Who steps the embedded mode's one `Engine` (talks, scenes and player sessions share it, and its KV
cache): exactly one thread calls `Engine.tick()` at any time.

- While the embedded player server runs, its real-time `EngineLoop` owns `tick()` (every 80 ms); a
  talk or scene is then one more live session on that loop and runs at real time.
- While it does not, this `Driver`'s thread ticks back to back (as fast as the model allows), only
  while some offline conversation is open.

A conversation holds `lock` (the engine lock) while it opens its sessions and queues their first
input; meanwhile the driver's thread ticks no more (it finishes a tick under way first: `tick_lock`),
so that the sessions start at the same tick with their input in place. Conversations are fed from their sessions' listeners (called after each tick: on this thread,
or on the loop's dispatch thread), never by the thread that ticks, so the same code runs in both cases.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

log = logging.getLogger("mcp_server")


class Driver:
    def __init__(self, engine: Any):
        self.engine = engine
        self.lock = threading.Lock()  # held by a conversation opening its sessions
        self.tick_lock = threading.Lock()  # held around each offline tick
        self._cond = threading.Condition()
        self._open = 0  # offline conversations open
        self._admitting = 0  # conversations waiting for `lock`: the thread steps aside between ticks
        self._realtime = False  # an EngineLoop owns tick()
        self._closed = False
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None

    # --- conversations --------------------------------------------------------------------------

    def admitting(self, delta: int) -> None:
        """+1 before a conversation takes `lock` and `tick_lock`, -1 once it has let them go."""
        with self._cond:
            self._admitting += delta
            self._cond.notify_all()

    def enter(self) -> None:
        """A conversation opened its sessions: tick (unless the real-time loop does) until `leave`."""
        with self._cond:
            self._open += 1
            self._closed = False  # a backend closed and used again (an MCP session ended, another began)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="mcp-offline-engine", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def leave(self) -> None:
        with self._cond:
            self._open -= 1
            self._cond.notify_all()

    # --- the real-time loop takes over ----------------------------------------------------------

    def hand_over(self) -> None:
        """Stops offline ticking (waits for a tick under way) before an `EngineLoop` starts."""
        with self._cond:
            self._realtime = True
        with self.tick_lock:  # a tick under way ends first
            pass

    def take_back(self) -> None:
        """After the `EngineLoop` stopped: offline ticking resumes for the conversations still open."""
        with self._cond:
            self._realtime = False
            self._cond.notify_all()

    @property
    def realtime(self) -> bool:
        return self._realtime

    def close(self) -> None:
        """Ends the thread once no conversation is open (a later `enter` starts a new one)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    # --- the thread -----------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._closed and self._open == 0) and (self._open == 0 or self._realtime or self._admitting):
                    self._cond.wait(0.5)
                if self._closed and self._open == 0:
                    self._thread, self._closed = None, False  # `enter` starts another
                    return
            with self.tick_lock:
                if self._realtime or self._admitting:
                    continue
                try:
                    self.engine.tick()  # builds first; the listeners are called here, after the frame
                except BaseException as exc:  # the conversations see it and fail
                    log.exception("the offline engine tick failed")
                    self.error = exc
                    time.sleep(0.1)
