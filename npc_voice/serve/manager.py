"""The server's connections and conversation slots over one or several engines (one per device:
`npc-voice serve --devices`), and the one path from a `start`/`switch` character to the engine's
`Persona` (its errors as the protocol's)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from ..characters import ResolveError, resolve_persona
from ..engine import Engine, EngineFull, Persona, Session
from ..protocol import ErrorCode, InlineCharacter, Limits, ProtocolError

if TYPE_CHECKING:
    from .connection import Connection
    from .realtime import RealtimeConnection


def resolve_character(store: Any, spec: str | InlineCharacter, limits: Limits) -> tuple[Persona, str]:
    """A start/switch `character` -> (the engine's Persona, a label for `started`/`switched`):
    `resolve_persona`, its `ResolveError` sent as the `ProtocolError` of the same code and message."""
    try:
        return resolve_persona(store, spec, limits)
    except ResolveError as exc:
        raise ProtocolError(exc.code, exc.message) from None


def character_error(exc: Exception, ref: Any, what: str = "") -> ProtocolError:
    """`invalid_character` for a character `Engine.open`/`switch` could not use: its voice could not
    be read (ValueError, OSError: AudioError included), or its prompt failed to build."""
    reason = "voice cannot be used" if isinstance(exc, (ValueError, OSError)) else "prompt could not be built"
    return ProtocolError(ErrorCode.INVALID_CHARACTER, f"{what}the character's {reason}: {exc}", ref=ref)


@dataclass(frozen=True)
class Reservation:
    """A slot `SessionManager.reserve` took: which engine (its index in `engines`) and which slot."""

    engine: int
    slot: int


class SessionManager:
    """The server's connections and counters. Slots belong to the engines (`Engine.reserve`): one is
    taken per session being opened or live, so a full server answers `server_busy` before building
    anything. With several engines (one per device), a new session goes to the engine with the most
    free slots (the first of a tie) and stays there: its say/switch/close go to that engine.
    Characters' files are read and decoded on a thread pool, off the event loop."""

    def __init__(self, engines: Engine | Sequence[Engine], max_connections: int, build_workers: int = 4):
        self.engines: list[Engine] = [engines] if isinstance(engines, Engine) else list(engines)
        if not self.engines:
            raise ValueError("a server needs at least one engine")
        self.engine, self.max_connections = self.engines[0], max_connections
        self._pool = concurrent.futures.ThreadPoolExecutor(build_workers, thread_name_prefix="npc-voice-build")
        self.slots = sum(e.slots for e in self.engines)
        self.connections: set[Connection | RealtimeConnection] = set()
        self.started = self.refused_busy = 0
        self.started_by: dict[str, int] = {"ws": 0, "realtime": 0}  # sessions started, per protocol
        self.started_on = [0] * len(self.engines)  # sessions started, per engine
        self.dropped_output = self.dropped_input = 0
        self._placed: dict[int, tuple[Session, Engine]] = {}  # id(session) -> (session, its engine), until closed
        self._place_lock = threading.Lock()  # reserve: pick the emptiest engine and take its slot together

    def reserve(self) -> Reservation | None:
        """A slot for a session about to start, on the engine with the most free slots, or None
        (counted) when all are taken."""
        with self._place_lock:
            order = sorted(range(len(self.engines)), key=lambda i: -self.engines[i].free_slots)
            for i in order:
                try:
                    return Reservation(i, self.engines[i].reserve())
                except EngineFull:
                    continue
        self.refused_busy += 1
        return None

    def count_started(self, kind: str) -> None:
        self.started += 1
        self.started_by[kind] = self.started_by.get(kind, 0) + 1

    def by_protocol(self) -> dict[str, int]:
        """Open connections per protocol: `ws` (docs/protocol.md), `realtime` (docs/realtime.md)."""
        counts = {"ws": 0, "realtime": 0}
        for conn in list(self.connections):
            counts[conn.kind] = counts.get(conn.kind, 0) + 1
        return counts

    def release(self, reservation: Reservation) -> None:
        """Gives back a reserved slot no session got (a no-op once a session holds it)."""
        self.engines[reservation.engine].release(reservation.slot)

    @property
    def free(self) -> int:
        return sum(e.free_slots for e in self.engines)

    @property
    def reserved(self) -> int:
        return self.slots - self.free

    # --- a session's engine: where it was opened, for good ----------------------------------------

    def engine_of(self, session: Session) -> Engine:
        placed = self._placed.get(id(session))
        return placed[1] if placed is not None and placed[0] is session else self.engine

    def close(self, session: Session) -> None:
        self.engine_of(session).close(session)
        self._placed.pop(id(session), None)

    def say(self, session: Session, text: str) -> None:
        self.engine_of(session).say(session, text)

    def switch(self, session: Session, persona: Persona) -> concurrent.futures.Future:
        """Hot swap on the session's own engine (blocking: reads the voice; run it off the loop)."""
        return self.engine_of(session).switch(session, persona)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def run_blocking(self, fn: Any, *args: Any) -> Any:
        """Runs file reading and decoding off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args))

    async def open_session(self, persona: Persona, seed: int | None, listener: Any, ref: Any,
                           slot: Reservation | None = None) -> Session:
        """Opens the engine session (in `slot`, reserved by `reserve`; without one, in the first free
        slot of the first engine) and waits until its character is installed (a new character is
        built by the engine thread meanwhile)."""
        engine = self.engines[slot.engine] if slot is not None else self.engine
        try:
            session = await self.run_blocking(functools.partial(
                engine.open, persona, seed=seed, listener=listener, slot=slot.slot if slot is not None else None))
        except EngineFull:
            raise ProtocolError(ErrorCode.SERVER_BUSY, "all conversation slots are in use: retry later", ref=ref) from None
        except (ValueError, OSError) as exc:
            raise character_error(exc, ref) from None
        self._placed[id(session)] = (session, engine)
        try:
            await asyncio.wrap_future(session.started)
        except asyncio.CancelledError:
            self.close(session)  # the client left while its character was being built
            raise
        except Exception as exc:  # the build failed: this character only, nothing else is touched
            self._placed.pop(id(session), None)
            raise character_error(exc, ref) from None
        self.started_on[self.engines.index(engine)] += 1
        return session
