"""One websocket client: moves its frames into a `ServerSession` (npc_voice.protocol), carries out
what the session asks of the engine, and writes what it has to send. Every protocol decision (what
to answer, when a session starts or ends, which frame a switch takes effect at, drop reports) is
the session's; this module only moves bytes, waits, and talks to the engine.

Two threads feed the session: the engine's listener (NPC frames) and the event loop (everything
else). They share one re-entrant lock, held while the session changes state and while its output
moves to the outbox, so the outbox gets everything in the session's order (no frame after `ended`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from websockets.protocol import State

from ..engine import FrameEvent, Session
from ..protocol import ErrorCode, ProtocolError, Start, Switch
from ..protocol.session import (
    AudioReceived, LiveSession, OutgoingAudio, SayRequest, ServerEvent, ServerSession, SessionEnded, StartRequest,
    SwitchRequest,
)
from .config import SERVER_NAME
from .manager import character_error, resolve_character
from .outbox import Outbox

if TYPE_CHECKING:
    from .app import NPCVoiceServer

log = logging.getLogger("npc_voice.server")


def _resolve_future(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Connection:
    """One websocket client; a sender task is the only writer to the socket."""

    kind = "ws"  # the protocol, as /health counts connections

    def __init__(self, server: NPCVoiceServer, ws: Any):
        self.server, self.ws = server, ws
        self.config = server.config
        self.limits = server.config.limits
        self.lock = threading.RLock()
        self.outbox = Outbox(asyncio.get_running_loop(), self.config.out_audio_frames, self.config.out_events)
        self.protocol = ServerSession(self.limits, server=SERVER_NAME, idle_timeout=self.config.idle_timeout,
                                      dropped_report_s=self.config.dropped_report_s, lock=self.lock,
                                      visemes=self.config.visemes)
        self.current: tuple[LiveSession, Session] | None = None  # the live session and its engine session
        self.first_frame: asyncio.Future[None] | None = None  # the live session's `started` is queued
        self.last_rx = time.monotonic()
        self.handling = False  # a message is being handled (a start may wait for a build): the idle timer waits
        self.closed = False
        self._close_with: tuple[int, str] | None = None
        self._tasks: set[asyncio.Task] = set()  # switches waiting for their character
        self._switch_order = asyncio.Lock()  # switches reach the engine in the order they were sent

    # --- life cycle -----------------------------------------------------------------------------

    async def run(self) -> None:
        from websockets.exceptions import ConnectionClosed

        sender = asyncio.create_task(self._send_loop())
        watchdog = asyncio.create_task(self._watchdog())
        self.flush()  # hello
        if self.server.closing:  # accepted just before the server began to stop
            self.shut_down()
        try:
            async for message in self.ws:
                self.last_rx = time.monotonic()
                self.handling = True
                try:
                    if isinstance(message, str):
                        self.protocol.receive_text(message)
                    else:
                        self.protocol.receive_bytes(message)
                    await self._carry_out()
                except Exception as exc:  # our fault, not the client's: said and logged, never a 1011 close
                    log.exception("a client message failed")
                    self.protocol.refuse(exc)
                finally:  # nothing is read while a message is handled: that time is not the client's idling
                    self.handling = False
                    self.last_rx = time.monotonic()
                    self.pump()
                self.handling = True  # waiting for the replies to go out is not the client's idling
                try:
                    await self.outbox.json_room(lambda: self.ws.state is State.OPEN)
                finally:
                    self.handling = False
                    self.last_rx = time.monotonic()
        except ConnectionClosed:
            pass
        finally:
            self.closed = True
            self.protocol.end(None)  # a vanished client frees its slot at the engine's next tick
            self.pump()
            for task in (watchdog, sender, *self._tasks):
                task.cancel()
            await asyncio.gather(watchdog, sender, *self._tasks, return_exceptions=True)

    def shut_down(self) -> None:
        """The server is stopping: `shutting_down` (fatal), `ended` for a live session, close 1001."""
        self.protocol.shut_down()
        self.pump()

    def engine_failed(self, error: BaseException) -> None:
        """The engine's thread died: a live session gets `internal_error`, then `ended` (reason `error`)."""
        self.protocol.engine_failed(error)
        self.pump()

    def flush(self) -> None:
        """Moves what the session has to send into the outbox (any thread; in the session's order)."""
        with self.lock:
            for item in self.protocol.data_to_send():
                if isinstance(item, OutgoingAudio):
                    self.outbox.put_audio(item.live, item.frame, item.pcm, item.before)
                else:
                    self.outbox.put_json(item)

    def pump(self) -> None:
        """(event loop) Sends what is queued, carries out the session's engine requests that need no
        waiting, and closes when the session says so."""
        for event in self.protocol.events_received():
            self._carry_out_now(event)
        self.flush()
        if self.protocol.close_code is not None:
            self.close_after_flush(*self.protocol.close_code)

    def close_after_flush(self, code: int, reason: str) -> None:
        """Sends what is queued, then closes; a client that does not read is cut off after the grace time."""
        if self._close_with is None:
            self._close_with = (code, reason)
            self.outbox.kick()
            asyncio.get_running_loop().call_later(self.config.close_grace_s, self._abort)

    def _abort(self) -> None:
        if not self.closed:
            transport = getattr(self.ws, "transport", None)
            if transport is not None:
                transport.abort()

    async def _send_loop(self) -> None:
        ws, manager = self.ws, self.server.manager
        while True:
            item = self.outbox.pop()
            if item is None:
                if self._close_with is not None:
                    await ws.close(*self._close_with)
                    return
                await self.outbox.wait()
                continue
            if item[0] == "json":
                await ws.send(item[1])
                continue
            _, live, frame, pcm, before = item
            if before is not None:
                await ws.send(before)
            await ws.send(live.encode(frame, pcm))
            dropped = self.protocol.audio_sent(live, time.monotonic())
            if dropped is not None:
                manager.dropped_output += dropped.output_frames
                manager.dropped_input += dropped.input_frames
                self.flush()

    async def _watchdog(self) -> None:
        timeout = self.config.idle_timeout
        while True:
            idle = time.monotonic() - self.last_rx
            if idle >= timeout and not self.handling:
                self.protocol.idle_timeout(timeout)
                self.pump()
                return
            await asyncio.sleep(min(1.0, max(0.05, timeout - idle)))

    # --- what the session asks of the engine ----------------------------------------------------

    async def _carry_out(self) -> None:
        """(event loop) Carries out the session's requests, waiting for those that take time."""
        while events := self.protocol.events_received():
            for event in events:
                if isinstance(event, StartRequest):
                    await self._start(event.message)
                elif isinstance(event, SwitchRequest):  # the player's audio keeps flowing meanwhile
                    task = asyncio.create_task(self._switch_in_background(event.message))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                else:
                    self._carry_out_now(event)
            self.flush()

    def _carry_out_now(self, event: ServerEvent) -> None:
        if isinstance(event, AudioReceived):
            if self.current is not None:
                session = self.current[1]
                session.push_audio(event.samples)
                self.protocol.input_dropped(session.input.dropped_frames)
        elif isinstance(event, SayRequest):
            if self.current is not None:
                try:
                    self.server.manager.say(self.current[1], event.message.text)
                except Exception as exc:
                    self._refuse(exc, event.message)
        elif isinstance(event, SessionEnded):
            self._session_ended(event.live)
        else:  # a start or switch arrives only with a client message (`_carry_out`)
            raise AssertionError(f"{type(event).__name__} outside a client message")

    def _refuse(self, exc: Exception, request: Any) -> None:
        if not isinstance(exc, ProtocolError):
            log.exception("a client message failed", exc_info=exc)
        self.protocol.refuse(exc, request)

    def _session_ended(self, live: LiveSession) -> None:
        if self.first_frame is not None and not self.first_frame.done():
            self.first_frame.cancel()
        if self.current is None or self.current[0] is not live:
            return  # not opened yet: the start that opens it closes it
        session, self.current = self.current[1], None
        self.server.manager.close(session)  # frees its slot
        manager = self.server.manager
        manager.dropped_output += live.dropped_output - live.reported_output
        manager.dropped_input += live.dropped_input - live.reported_input

    def _on_frame(self, live: LiveSession, first_frame: asyncio.Future[None], event: FrameEvent) -> None:
        """The engine's frame listener (its dispatcher thread, not the engine thread: the mouth track
        is computed here, in `receive_frame`): never blocks, never raises into the engine."""
        try:
            if self.protocol.receive_frame(live, event.session_id, event.frame, event.text, event.pcm):
                self.outbox.loop.call_soon_threadsafe(_resolve_future, first_frame)
            self.flush()
        except Exception:  # never let a client's bookkeeping stop the engine
            log.exception("frame listener failed")

    async def _start(self, msg: Start) -> None:
        server, manager = self.server, self.server.manager
        try:
            slot = server.claim_slot()
            try:
                persona, label = await manager.run_blocking(resolve_character, server.store, msg.character,
                                                            self.limits)
                live = self.protocol.start_accepted(label, msg)
                first_frame = self.first_frame = asyncio.get_running_loop().create_future()
                session = await manager.open_session(persona, msg.seed,
                                                     functools.partial(self._on_frame, live, first_frame), msg.ref, slot)
            except BaseException:
                manager.release(slot)  # a no-op once a session holds it (closing it frees it)
                raise
        except Exception as exc:
            self._refuse(exc, msg)
            return
        manager.count_started(self.kind)
        self.current = (live, session)
        self.protocol.start_opened(live, session.id)  # a connection closing meanwhile ends it at once
        if self.closed:  # the client left while its character was being prepared
            self.protocol.end(None)

    async def _switch_in_background(self, msg: Switch) -> None:
        """A switch carried out beside the receive loop: a character that must be built first
        takes its time (most of a second on a CPU) while the player's audio is still read, so
        none of it piles up and is dropped."""
        try:
            await self._switch(msg)
        except Exception as exc:
            self._refuse(exc, msg)
        self.pump()

    async def _switch(self, msg: Switch) -> None:
        if self.current is None or self.first_frame is None:
            raise ProtocolError(ErrorCode.NO_SESSION, "switch: the session has ended")
        (live, session), first_frame = self.current, self.first_frame
        try:  # `started` goes out first: afterwards a frame 0 means the switch was installed
            await asyncio.shield(first_frame)
        except asyncio.CancelledError:
            if first_frame.cancelled():  # the session ended meanwhile
                raise ProtocolError(ErrorCode.NO_SESSION, "switch: the session has ended") from None
            raise
        manager = self.server.manager
        done = ack = None
        try:
            async with self._switch_order:
                persona, label = await manager.run_blocking(resolve_character, self.server.store, msg.character,
                                                            self.limits)
                if self.current is None or self.current[0] is not live:
                    return  # ended meanwhile
                ack = self.protocol.switch_accepted(label, msg)
                # Returns once the voice is read; the character is installed (and `switched` sent
                # with its first frame) when the engine thread has built it, while the old one goes on.
                done = await manager.run_blocking(manager.switch, session, persona)  # on the session's engine
            await asyncio.wrap_future(done)
        except BaseException as exc:
            if ack is None:
                raise
            self.protocol.switch_settled(ack)
            if done is not None and done.cancelled():
                return  # superseded by a later switch, or the session ended
            if isinstance(exc, Exception):
                raise character_error(exc, msg.ref, "switch: ") from None
            raise
