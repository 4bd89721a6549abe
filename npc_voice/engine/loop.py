"""The real-time loop: `Engine.tick()` every 80 ms on its own thread, and in what is left of each
period, the engine's installs and character builds (`Engine.build`)."""

from __future__ import annotations

import collections
import itertools
import logging
import queue
import sys
import threading
import time

import torch

from ..model.config import FRAME_SECONDS
from .engine import Engine
from .session import percentile

log = logging.getLogger(__name__)


class EngineLoop:
    """Runs `engine.tick()` every 80 ms on a background thread; records tick times. The sessions'
    listeners are called on a second thread, in order, so that what they do (a server encodes
    messages) never takes the engine thread's time."""

    def __init__(self, engine: Engine, period: float = FRAME_SECONDS, catch_up: int = 3,
                 build_margin: float = 0.002):
        self.engine, self.period, self.catch_up = engine, period, catch_up
        self.build_margin = build_margin  # seconds of each period kept free of builds (tick jitter; 2 ms: docs/performance.md)
        self.tick_ms: collections.deque[float] = collections.deque(maxlen=1000)
        self.overruns = 0
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._frames: queue.SimpleQueue = queue.SimpleQueue()  # each tick's (session, frame) pairs; None: stop
        self._dispatcher: threading.Thread | None = None
        self.error: BaseException | None = None

    def start(self) -> EngineLoop:
        """Starts the loop's thread and returns once the thread is warmed up
        (`Engine.warm_up_thread`); the first tick follows at once."""
        # A thread waiting for the GIL gets it after at most this long: keeps the engine thread's
        # launches prompt while other threads (the server, voice decoding) run Python.
        sys.setswitchinterval(min(sys.getswitchinterval(), 0.001))
        self._dispatcher = threading.Thread(target=self._dispatch, name="npc-voice-listeners", daemon=True)
        self._dispatcher.start()
        self._thread = threading.Thread(target=self._run, name="npc-voice-engine", daemon=True)
        self._thread.start()
        self._ready.wait()  # the thread's warm-up is done: the first tick is due now
        if self.error is not None:
            raise self.error
        return self

    def stop(self) -> None:
        self._stop.set()
        self.engine.work.set()
        if self._thread is not None:
            self._thread.join()
        if self._dispatcher is not None:
            self._frames.put(None)
            self._dispatcher.join()

    def _dispatch(self) -> None:
        while (events := self._frames.get()) is not None:
            try:
                self.engine.notify(events)
            except Exception:  # a listener's fault must not stop the others' frames
                log.exception("a frame listener failed")

    def _run(self) -> None:
        device = self.engine.model.device
        if device.type == "cuda" and device.index is not None:  # this thread's launches and replays go
            torch.cuda.set_device(device)  # to its engine's GPU (--devices: one engine per GPU)
        try:
            self.engine.warm_up_thread()
        except BaseException as exc:
            self.error = exc
            raise
        finally:
            self._ready.set()
        deadline = time.perf_counter()
        while not self._stop.is_set():
            start = time.perf_counter()
            try:
                events: list = []
                self.engine.tick(builds=False, notify=events)
                self._frames.put(events)
                elapsed = time.perf_counter() - start
                self.tick_ms.append(elapsed * 1000)
                deadline += self.period
                # What is left of the period goes to installs and character builds, by whole
                # operations whose measured cost fits before the next tick is due.
                budget = deadline - time.perf_counter() - self._margin()
                if budget > 0 or self.engine.builds_pending:
                    self.engine.build(max(budget, 0.0))
            except BaseException as exc:  # keep the error for whoever runs the loop
                self.error = exc
                raise
            delay = deadline - time.perf_counter()
            if delay >= 0:
                self._idle(deadline)
            else:
                self.overruns += 1
                # A late tick is made up by the next ones (back to back) while the lag stays under
                # `catch_up` periods; past that the schedule restarts from now (frames are late,
                # not lost: clients' jitter buffers absorb a short burst).
                if -delay > self.catch_up * self.period:
                    deadline = time.perf_counter()

    def _idle(self, deadline: float) -> None:
        """Waits for the next tick; a character asked for meanwhile starts building at once, in
        what is left before the tick (not after it: a period sooner)."""
        engine = self.engine
        while not self._stop.is_set():
            delay = deadline - time.perf_counter()
            if delay <= 0 or not engine.work.wait(delay):
                return
            engine.work.clear()
            budget = deadline - time.perf_counter() - self._margin()
            if budget > 0:
                try:
                    engine.build(budget)
                except BaseException as exc:
                    self.error = exc
                    raise

    def _margin(self) -> float:
        """Seconds of the period kept free of builds: `build_margin` plus how much slower than
        usual a tick has lately been (its p90 over p50: a machine with noisy ticks keeps more)."""
        recent = list(itertools.islice(reversed(self.tick_ms), 50))
        return self.build_margin + max(0.0, percentile(recent, 0.9) - percentile(recent, 0.5)) / 1000

    def percentile(self, q: float) -> float:
        return percentile(self.tick_ms, q)
