"""The server's connections and conversation slots, and the one path from a `start`/`switch`
character to the engine's `Persona` (its errors as the protocol's)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
from typing import TYPE_CHECKING, Any

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


class SessionManager:
    """The server's connections and counters. Slots belong to the engine (`Engine.reserve`): one is
    taken per session being opened or live, so a full server answers `server_busy` before building
    anything. Characters' files are read and decoded on a thread pool, off the event loop."""

    def __init__(self, engine: Engine, max_connections: int, build_workers: int = 4):
        self.engine, self.max_connections = engine, max_connections
        self._pool = concurrent.futures.ThreadPoolExecutor(build_workers, thread_name_prefix="npc-voice-build")
        self.slots = engine.slots
        self.connections: set[Connection | RealtimeConnection] = set()
        self.started = self.refused_busy = 0
        self.started_by: dict[str, int] = {"ws": 0, "realtime": 0}  # sessions started, per protocol
        self.dropped_output = self.dropped_input = 0

    def reserve(self) -> int | None:
        """A slot for a session about to start, or None (counted) when all are taken."""
        try:
            return self.engine.reserve()
        except EngineFull:
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

    def release(self, slot: int) -> None:
        self.engine.release(slot)

    @property
    def free(self) -> int:
        return self.engine.free_slots

    @property
    def reserved(self) -> int:
        return self.slots - self.free

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def run_blocking(self, fn: Any, *args: Any) -> Any:
        """Runs file reading and decoding off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args))

    async def open_session(self, persona: Persona, seed: int | None, listener: Any, ref: Any,
                           slot: int | None = None) -> Session:
        """Opens the engine session (in `slot`, reserved by `reserve`) and waits until its character
        is installed (a new character is built by the engine thread meanwhile)."""
        try:
            session = await self.run_blocking(functools.partial(self.engine.open, persona, seed=seed, listener=listener,
                                                                slot=slot))
        except EngineFull:
            raise ProtocolError(ErrorCode.SERVER_BUSY, "all conversation slots are in use: retry later", ref=ref) from None
        except (ValueError, OSError) as exc:
            raise character_error(exc, ref) from None
        try:
            await asyncio.wrap_future(session.started)
        except asyncio.CancelledError:
            self.engine.close(session)  # the client left while its character was being built
            raise
        except Exception as exc:  # the build failed: this character only, nothing else is touched
            raise character_error(exc, ref) from None
        return session
