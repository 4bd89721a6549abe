"""Conversations on the MCP server's own `Engine` (embedded mode): each NPC is one session of the
ONE shared engine, so concurrent conversations each take free slots and progress together.

The engine lock (driver.py) is held only while a conversation opens its sessions and queues their
first input, so that they start at the same tick with their input in place; the sessions are then
fed from their listeners (after each frame, on whichever thread ticks: the `Driver`'s, or the
player server's real-time loop), which is why a talk's reply is the same for the same seed and a
scene's NPC always hears the other's previous frame.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Sequence

import anyio

from npc_voice.audio import AudioError
from npc_voice.characters import CharacterError

from .conversations import Conversations, Feed, Line, Progress, ServerBusy, Side, UserError, settle, watch
from .records import Record

if TYPE_CHECKING:
    from .backend import Backend


class LocalLine(Line):
    """An engine session."""

    def __init__(self, side: Side, frames: int, engine: Any):
        super().__init__(side, frames)
        self.engine = engine
        self.session: Any = None  # set once open

    def push(self, pcm: Any) -> None:
        self.session.push_audio(pcm)

    def close(self) -> None:
        self.done = True
        self.engine.close(self.session)  # the engine reuses a slot whose close is pending, even before its next tick


class LocalConversations(Conversations):
    def __init__(self, backend: Backend):
        self.backend = backend

    def check(self, character: str) -> None:
        self.backend.persona(character)

    async def run(self, record: Record, sides: Sequence[Side], frames: int, feed: Feed,
                  progress: Progress) -> list[Line]:
        personas = [self.backend.persona(side.character) for side in sides]  # unknown: UserError
        if not self.backend.model_loaded:
            await progress(0, frames, "loading the model (first conversation)")
        driver = await anyio.to_thread.run_sync(self.backend.driver)  # loads the model: no lock held meanwhile
        engine = driver.engine
        lines = [LocalLine(side, frames, engine) for side in sides]
        await self._admit(driver)
        try:
            try:
                await progress(0, frames, "building the characters' prompts (cached afterwards)")
                # The real-time loop may install and step a session as soon as it is open: its
                # listener waits (on the loop's dispatch thread) until the feed has started.
                ready = threading.Event()
                try:
                    for i, (line, persona) in enumerate(zip(lines, personas)):
                        line.session = await anyio.to_thread.run_sync(
                            _open, engine, persona, line.side.seed, self._listener(record, lines, i, feed, ready))
                    for line in lines:
                        if line.side.say is not None:
                            engine.say(line.session, line.side.say)
                    feed.start(lines)
                finally:
                    ready.set()  # (a failed open: its sessions are closed below, before their listeners matter)
                driver.enter()  # ticks from now on (unless the real-time loop does)
            finally:
                self._admitted(driver)
            try:
                await watch(record, lines, frames, progress, lambda: _failed(driver, lines))
            finally:
                driver.leave()
        finally:
            for line in lines:
                if line.session is not None:
                    engine.close(line.session)
        settle(record, lines, frames)
        return list(lines)

    @staticmethod
    def _listener(record: Record, lines: Sequence[LocalLine], i: int, feed: Feed,
                  ready: threading.Event) -> Callable[[Any], None]:
        line = lines[i]

        def heard(ev: Any) -> None:  # after each frame, on the ticking thread
            ready.wait(5)
            if line.done:
                return
            if ev.text:
                line.texts.append((ev.frame, ev.text))
            line.keep(ev.frame, ev.pcm)
            feed.heard(lines, i, ev.frame, ev.pcm)
            if ev.frame + 1 >= line.frames or record.stop.is_set():
                line.close()  # no tick past the last frame

        return heard

    async def _admit(self, driver: Any) -> None:
        """Takes the engine lock (and waits out a tick under way), or ServerBusy after `busy_wait_s`."""
        lock, wait = driver.lock, self.backend.settings.busy_wait_s
        deadline = time.monotonic() + wait
        driver.admitting(1)  # the offline thread ticks no more until `_admitted`
        try:
            while not lock.acquire(blocking=False):
                if time.monotonic() >= deadline:
                    raise ServerBusy(f"server busy: the engine has been held for over {wait:g} s; "
                                     "retry later (end_session stops a conversation)")
                await anyio.sleep(0.005)
            try:
                while not driver.tick_lock.acquire(blocking=False):  # a tick under way: one frame at most
                    await anyio.sleep(0.002)
            except BaseException:
                lock.release()
                raise
        except BaseException:
            driver.admitting(-1)
            raise

    @staticmethod
    def _admitted(driver: Any) -> None:
        """Lets go of what `_admit` took."""
        driver.tick_lock.release()
        driver.lock.release()
        driver.admitting(-1)


def _open(engine: Any, persona: Any, seed: int, listener: Callable[[Any], None]) -> Any:
    from npc_voice.engine import EngineFull

    try:
        return engine.open(persona, seed=seed, listener=listener)
    except EngineFull:
        raise ServerBusy("server busy: every conversation slot of the embedded engine is in use; retry later") from None
    except (ValueError, AudioError, CharacterError) as exc:
        raise UserError(f"the character cannot be used: {exc}") from None


def _failed(driver: Any, lines: Sequence[LocalLine]) -> None:
    if driver.error is not None and not driver.realtime:
        raise UserError(f"the engine failed: {driver.error}")
    for line in lines:
        started = line.session.started
        if started.done() and not started.cancelled() and started.exception() is not None:
            raise UserError(f"the character cannot be used: {started.exception()}")
