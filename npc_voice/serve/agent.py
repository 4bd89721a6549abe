"""The HAProxy agent check (`npc-voice serve --agent-port`, docs/deploy.md): a tiny TCP server that
answers each connection with one line in HAProxy's agent protocol, then closes it. HAProxy reads
the words (its configuration manual, "agent-check"):

- `up ready N%`: serving; the weight is N% of the server's configured weight, N the share of free
  conversation slots (1-100), so `leastconn` sends new conversations where slots are free;
- `drain`: every slot is taken, or the server is stopping (SIGTERM): no new connections, live
  ones go on (a later `ready` takes the server back);
- `down#...`: the engine stopped (an `up` brings the server back should that ever change).

Only the agent can undo what it said, so every answer names the administrative state (`ready` or
`drain`) and, but for `down`, the operational one (`up`)."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import NPCVoiceServer

log = logging.getLogger("npc_voice.server")


def agent_reply(free: int, total: int, closing: bool = False, error: BaseException | str | None = None) -> str:
    """The agent's answer line for a server with `free` of `total` slots free."""
    if error is not None:
        return "down#engine stopped\n"
    if closing:
        return "drain\n"
    if total <= 0 or free <= 0:
        return "drain\n"
    return f"up ready {max(1, min(100, round(100 * free / total)))}%\n"


def server_reply(server: NPCVoiceServer) -> str:
    return agent_reply(server.manager.free, server.manager.slots, server.closing, server.loop_error)


async def start_agent(server: NPCVoiceServer, host: str, port: int) -> Any:
    """Starts the agent listener on `host`:`port` (0: any free port); returns the asyncio server."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(server_reply(server).encode("ascii"))
            await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(answer, host, port)
