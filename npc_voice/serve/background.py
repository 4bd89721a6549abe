"""`BackgroundServer`: an `NPCVoiceServer` on its own event loop thread, for programs that are not
asyncio (a game's editor tooling, the example game, the MCP server, tests)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from ..engine import Engine
from ..protocol import WS_PATH
from .app import NPCVoiceServer
from .config import ServerConfig


class BackgroundServer:
    """An `NPCVoiceServer` on its own event loop thread, for programs that are not asyncio (a game's
    editor tooling, tests): `with BackgroundServer(engine, config, store) as bg: bg.url ...`."""

    def __init__(self, engine: Engine, config: ServerConfig | None = None, store: Any = None):
        self.server = NPCVoiceServer(engine, config, store)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="npc-voice-server", daemon=True)

    @property
    def url(self) -> str:
        host = self.server.config.host
        host = f"[{host}]" if ":" in host else host
        return f"ws://{host}:{self.server.port}{WS_PATH}"

    def call(self, fn: Any, *args: Any) -> Any:
        """Runs `fn(*args)` on the server's loop (a coroutine function is awaited); returns its result."""
        async def run() -> Any:
            result = fn(*args)
            return await result if asyncio.iscoroutine(result) else result

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result()

    def start(self) -> BackgroundServer:
        self._thread.start()
        self.call(self.server.start)
        return self

    def stop(self) -> None:
        try:
            self.call(self.server.stop)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join()
            self.loop.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
