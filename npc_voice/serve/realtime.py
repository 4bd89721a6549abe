"""One OpenAI-Realtime client at `/v1/realtime` (docs/realtime.md): moves its text frames into a
`RealtimeSession` (npc_voice.realtime), carries out what the session asks of the engine (the same
Engine, slots and character resolution as `/ws`), and writes what it has to send. Every protocol
decision is the session's; this module only moves bytes, waits, and talks to the engine."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from websockets.protocol import State

from ..characters.model import ID_PATTERN, PRESET_PATTERN, Character as StoredCharacter, CharacterError
from ..engine import FrameEvent, Persona, Session
from ..protocol import ErrorCode, InlineCharacter, Limits, ProtocolError
from ..realtime import (
    AudioDelta, Character, CloseConversation, DropScript, OpenConversation, PushAudio, RealtimeError,
    RealtimeErrorCode as Code, RealtimeSession, SayLine, SwitchCharacter,
)
from .manager import character_error, resolve_character
from .outbox import Outbox

if TYPE_CHECKING:
    from .app import NPCVoiceServer

log = logging.getLogger("npc_voice.server")

REALTIME_PATH = "/v1/realtime"
PRESET_ROLE = "You are a helpful character in a game. Talk with the player."  # a preset voice without instructions


def resolve_realtime(store: Any, character: Character, limits: Limits) -> tuple[Persona, str]:
    """A Realtime `voice` (+ `instructions`) -> (Persona, label): a stored character's id (its voice
    and sampling; `instructions`, when given, replace its role), else a preset voice name with
    `instructions` as the role. Raises `ProtocolError` with our protocol's codes."""
    voice, role = character.voice, character.instructions
    if store is not None and ID_PATTERN.match(voice) and voice in store:
        persona, label = resolve_character(store, voice, limits)
        if role:
            try:
                StoredCharacter.parse({"id": label, "name": label, "role": role}, tokenizer=store.tokenizer)
            except CharacterError as exc:
                raise ProtocolError(ErrorCode.INVALID_CHARACTER, f"instructions: {exc}") from None
            persona = dataclasses.replace(persona, role=role)
        return persona, label
    if not PRESET_PATTERN.match(voice):
        raise ProtocolError(ErrorCode.UNKNOWN_CHARACTER, f"voice {voice[:64]!r} is neither a character nor a preset")
    try:
        return resolve_character(store, InlineCharacter(role=role or PRESET_ROLE, voice={"preset": voice},
                                                        name=voice), limits)
    except ProtocolError as exc:
        if exc.code is ErrorCode.UNKNOWN_VOICE:
            raise ProtocolError(ErrorCode.UNKNOWN_CHARACTER, f"voice {voice!r} is neither a character on this "
                                "server nor an installed preset voice") from None
        raise


def _as_realtime(exc: Exception) -> RealtimeError:
    if isinstance(exc, RealtimeError):
        return exc
    if isinstance(exc, ProtocolError):
        return RealtimeError(exc.code.value, exc.message, param="session.audio.output.voice")
    return RealtimeError(Code.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}")


class RealtimeConnection:
    """One Realtime client; a sender task is the only writer to the socket."""

    kind = "realtime"

    def __init__(self, server: NPCVoiceServer, ws: Any, model: str = ""):
        self.server, self.ws, self.config = server, ws, server.config
        self.lock = threading.RLock()
        self.outbox = Outbox(asyncio.get_running_loop(), self.config.out_audio_frames, self.config.out_events)
        store = server.store
        self.protocol = RealtimeSession(model, lock=self.lock,
                                        known_character=lambda n: store is not None and bool(ID_PATTERN.match(n))
                                        and n in store)
        self.session: Session | None = None
        self.last_rx = time.monotonic()
        self.closed = False
        self._close_with: tuple[int, str] | None = None
        self._tasks: set[asyncio.Task] = set()

    async def run(self) -> None:
        from websockets.exceptions import ConnectionClosed

        sender = asyncio.create_task(self._send_loop())
        watchdog = asyncio.create_task(self._watchdog())
        if self.server.closing:
            self.shut_down()
        self.pump()
        try:
            async for message in self.ws:
                self.last_rx = time.monotonic()
                try:
                    if isinstance(message, str):
                        self.protocol.receive_text(message)
                    else:
                        self.protocol.receive_bytes(message)
                except Exception as exc:  # our fault: said and logged, never a 1011 close
                    log.exception("a realtime client event failed")
                    self.protocol.error(_as_realtime(exc))
                self.pump()
                await self.outbox.json_room(lambda: self.ws.state is State.OPEN)  # the sender's turn, then room
        except ConnectionClosed:
            pass
        finally:
            self.closed = True
            self.protocol.ended()
            self.pump()
            for task in (watchdog, sender, *self._tasks):
                task.cancel()
            await asyncio.gather(watchdog, sender, *self._tasks, return_exceptions=True)

    def shut_down(self) -> None:
        self.protocol.ended(Code.SHUTTING_DOWN, "the server is shutting down", close=(1001, "server shutting down"))
        self.pump()

    def engine_failed(self, error: BaseException) -> None:
        self.protocol.ended(Code.INTERNAL_ERROR, f"the engine stopped: {error}")
        self.pump()

    # --- moving data ----------------------------------------------------------------------------

    def flush(self) -> None:
        """Moves what the session has to send into the outbox (any thread; in the session's order)."""
        with self.lock:
            for item in self.protocol.data_to_send():
                if isinstance(item, AudioDelta):
                    self.outbox.put_audio(item, 0, item)
                else:
                    self.outbox.put_json(item)

    def pump(self) -> None:
        """(event loop) Carries out the session's requests, sends what is queued, closes when told."""
        for request in self.protocol.requests():
            self._carry_out(request)
        self.flush()
        if self.protocol.close_code is not None and self._close_with is None:
            self._close_with = self.protocol.close_code
            self.outbox.kick()
            asyncio.get_running_loop().call_later(self.config.close_grace_s, self._abort)

    def _abort(self) -> None:
        transport = getattr(self.ws, "transport", None)
        if not self.closed and transport is not None:
            transport.abort()

    async def _send_loop(self) -> None:
        while True:
            item = self.outbox.pop()
            if item is None:
                if self._close_with is not None:
                    await self.ws.close(*self._close_with)
                    return
                await self.outbox.wait()
                continue
            await self.ws.send(item[1] if item[0] == "json" else item[3].render())

    async def _watchdog(self) -> None:
        timeout = self.config.idle_timeout
        while True:
            idle = time.monotonic() - self.last_rx
            if idle >= timeout:
                self.protocol.ended(Code.IDLE_TIMEOUT, f"nothing received for {timeout:.0f} s",
                                    close=(1000, "idle timeout"))
                self.pump()
                return
            await asyncio.sleep(min(1.0, max(0.05, timeout - idle)))

    # --- what the session asks of the engine ----------------------------------------------------

    def _carry_out(self, request: Any) -> None:
        engine = self.server.manager  # say/close go to the session's own engine
        if isinstance(request, PushAudio):
            if self.session is not None:
                self.session.push_audio(request.samples)
        elif isinstance(request, SayLine):
            if self.session is not None:
                engine.say(self.session, request.text)
        elif isinstance(request, DropScript):
            if self.session is not None:
                self.session.forced_text.clear()
        elif isinstance(request, CloseConversation):
            session, self.session = self.session, None
            if session is not None:
                engine.close(session)
        elif isinstance(request, (OpenConversation, SwitchCharacter)):
            task = asyncio.create_task(self._change(request))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _change(self, request: OpenConversation | SwitchCharacter) -> None:
        try:
            if isinstance(request, OpenConversation):
                await self._open(request.character)
            else:
                await self._switch(request.character)
        except Exception as exc:
            if not isinstance(exc, ProtocolError):
                log.exception("a realtime open/switch failed")
            self.protocol.refused(_as_realtime(exc))
        self.pump()

    def _on_frame(self, event: FrameEvent) -> None:
        """The engine listener (engine thread): never blocks, never raises into the engine."""
        try:
            self.protocol.receive_frame(event.frame, event.text, event.pcm)
            self.flush()
        except Exception:
            log.exception("realtime frame listener failed")

    async def _open(self, character: Character) -> None:
        server, manager = self.server, self.server.manager
        slot = server.claim_slot()
        try:
            persona, _ = await manager.run_blocking(resolve_realtime, server.store, character, self.config.limits)
            session = await manager.open_session(persona, None, self._on_frame, None, slot)
        except BaseException:
            manager.release(slot)
            raise
        manager.count_started(self.kind)
        self.session = session
        self.protocol.opened(character)
        if self.closed or self.protocol.phase != "live":
            self.protocol.ended()

    async def _switch(self, character: Character) -> None:
        manager, session = self.server.manager, self.session
        if session is None:
            raise RealtimeError(Code.CONVERSATION_NOT_STARTED, "the conversation has ended")
        persona, _ = await manager.run_blocking(resolve_realtime, self.server.store, character, self.config.limits)
        try:
            await manager.run_blocking(functools.partial(manager.switch, session, persona))
        except (ValueError, OSError) as exc:
            raise character_error(exc, None, "switch: ") from None
        self.protocol.switched(character)  # installed at a tick soon; frame 0 then starts the new character
