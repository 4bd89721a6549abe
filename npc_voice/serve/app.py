"""`NPCVoiceServer`: the asyncio websocket server around one `Engine` or several (one per device,
docs/deploy.md) (docs/protocol.md): the listener, each engine's real-time loop, and the watch on them. Each client is a `Connection`; the HTTP
side of a handshake is `handshake.py`, /health `health.py`."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Sequence

from ..engine import Engine, EngineLoop
from ..protocol import ErrorCode, ProtocolError
from .config import PKG_VERSION, ServerConfig, check_bind
from .agent import start_agent
from .connection import Connection
from .handshake import process_request
from .health import health
from .manager import Reservation, SessionManager
from .realtime import REALTIME_PATH, RealtimeConnection

log = logging.getLogger("npc_voice.server")


class NPCVoiceServer:
    """The websocket server around an `Engine`, or a list of them (one per device: a session stays on
    the engine it was opened on). Use `async with NPCVoiceServer(engine, config, store)` (or
    `await start()` / `await stop()`); `port` is the bound port."""

    def __init__(self, engine: Engine | Sequence[Engine], config: ServerConfig | None = None, store: Any = None):
        self.engines: list[Engine] = [engine] if isinstance(engine, Engine) else list(engine)
        self.engine = self.engines[0]  # the first (the only one unless --devices names several)
        self.config = config or ServerConfig()
        check_bind(self.config.host, self.config.token)
        self.store = store
        max_conn = self.config.max_connections or 4 * sum(e.slots for e in self.engines) + 4
        self.manager = SessionManager(self.engines, max_conn, self.config.build_workers)
        self.loop_runners: list[EngineLoop] = []
        self.drain_until = 0.0  # while draining: when live sessions are ended anyway
        self.closing = False  # draining or stopping: no new connection or session (HTTP 503, `shutting_down`)
        self.started_at = time.monotonic()
        self._server: Any = None
        self._monitor: asyncio.Task[None] | None = None
        self.port: int | None = None
        self._agent: Any = None
        self.agent_port: int | None = None  # the bound agent check port (ServerConfig.agent_port)

    @property
    def loop_runner(self) -> EngineLoop | None:
        """The first engine's loop."""
        return self.loop_runners[0] if self.loop_runners else None

    @property
    def loop_error(self) -> BaseException | None:
        """The first error of any engine's loop (one engine down: the server reports `error`)."""
        return next((r.error for r in self.loop_runners if r.error is not None), None)

    def claim_slot(self) -> Reservation:
        """A slot for a session about to start, or the documented refusal (`shutting_down`,
        `internal_error` once an engine stopped, `server_busy`): one rule for both protocols."""
        if self.closing:
            raise ProtocolError(ErrorCode.SHUTTING_DOWN, "the server is shutting down")
        if self.loop_error is not None:
            raise ProtocolError(ErrorCode.INTERNAL_ERROR, f"the engine stopped: {self.loop_error}")
        slot = self.manager.reserve()
        if slot is None:
            raise ProtocolError(ErrorCode.SERVER_BUSY, f"all {self.manager.slots} conversation slots are in use: "
                                "retry later")
        return slot

    # --- life cycle -----------------------------------------------------------------------------

    async def start(self) -> NPCVoiceServer:
        from websockets.asyncio.server import serve

        self.loop_runners = [EngineLoop(engine).start() for engine in self.engines]
        cfg = self.config
        self._server = await serve(
            self._handle, cfg.host, cfg.port, process_request=self._process_request,
            max_size=cfg.limits.max_message_bytes, max_queue=32, compression=None, write_limit=cfg.write_limit,
            ping_interval=cfg.ping_interval, ping_timeout=cfg.ping_timeout, close_timeout=cfg.close_grace_s,
            server_header=f"npc-voice/{PKG_VERSION}",
        )
        self.port = self._server.sockets[0].getsockname()[1]
        if cfg.agent_port is not None:
            self._agent = await start_agent(self, cfg.host, cfg.agent_port)
            self.agent_port = self._agent.sockets[0].getsockname()[1]
        self.started_at = time.monotonic()
        self._monitor = asyncio.create_task(self._watch_engine())
        return self

    def end_drain(self) -> None:
        """Cuts a drain short (a second SIGTERM, or SIGINT, during it): live sessions end now."""
        self.drain_until = 0.0

    async def stop(self, drain_s: float = 0.0) -> None:
        """Stops the server. `drain_s` > 0 (`npc-voice serve --drain-grace`): first a drain, where new
        connections and sessions are refused (`shutting_down`, /health `stopping`, the agent check
        `drain`) while live sessions go on, for at most `drain_s` seconds or until none is left;
        then every connection gets `shutting_down` (and `ended` for a live session) and close 1001."""
        self.closing = True
        self.drain_until = time.monotonic() + drain_s
        while self.manager.reserved and time.monotonic() < self.drain_until and self.loop_error is None:
            await asyncio.sleep(0.05)
        if self._monitor is not None:
            self._monitor.cancel()
        for conn in list(self.manager.connections):
            conn.shut_down()
        # The grace period: each connection sends what it has queued and closes (1001); meanwhile the
        # listener stays open and answers handshakes with HTTP 503 `shutting_down`, /health `stopping`.
        deadline = time.monotonic() + self.config.close_grace_s + 1
        while self.manager.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._server is not None:
            self._server.close()  # a connection still open now is closed with 1001
            try:
                await asyncio.wait_for(self._server.wait_closed(), self.config.close_grace_s + 1)
            except asyncio.TimeoutError:
                pass
        if self._agent is not None:
            self._agent.close()
        for runner in self.loop_runners:
            await asyncio.to_thread(runner.stop)
        self.manager.shutdown()

    async def __aenter__(self) -> NPCVoiceServer:
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()

    async def serve_forever(self) -> None:
        await self._server.serve_forever()

    # --- websockets hooks -----------------------------------------------------------------------

    def _process_request(self, connection: Any, request: Any) -> Any:
        return process_request(self, connection, request)

    async def _handle(self, ws: Any) -> None:
        sock = ws.transport.get_extra_info("socket") if ws.transport is not None else None
        if sock is not None and self.config.send_buffer_bytes:
            import socket

            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.config.send_buffer_bytes)
        from urllib.parse import parse_qs, urlsplit

        url = urlsplit(ws.request.path)
        if url.path == REALTIME_PATH:
            conn: Connection | RealtimeConnection = RealtimeConnection(self, ws, parse_qs(url.query).get("model", [""])[0])
        else:
            conn = Connection(self, ws)
        self.manager.connections.add(conn)
        try:
            await conn.run()  # a fault outside a message is logged by websockets and closes with 1011
        finally:
            self.manager.connections.discard(conn)

    async def _watch_engine(self) -> None:
        """Should the engine's thread die, every live session is told (`internal_error`, then
        `ended` with reason `error`) and new ones are refused; /health says `error`."""
        while self.loop_error is None:
            await asyncio.sleep(0.25)
        log.error("the engine loop stopped: %r", self.loop_error)
        for conn in list(self.manager.connections):
            conn.engine_failed(self.loop_error)

    def health(self) -> dict[str, Any]:
        return health(self)
