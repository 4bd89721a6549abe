"""`npc-voice serve`: the engine behind a websocket endpoint, for game engines (docs/protocol.md).

This package only moves bytes; the protocol's decisions are `npc_voice.protocol.ServerSession`'s.
- `app.py`: `NPCVoiceServer`, the asyncio websocket server and the engine's real-time loop;
- `connection.py`: one client, a `ServerSession` driven by its socket and the engine;
- `outbox.py`: the bounded queue between the engine thread and a connection's sender task;
- `manager.py`: connections and conversation slots over one engine per device, characters resolved
  off the event loop;
- `agent.py`: the HAProxy agent check (`--agent-port`: weight by free slots, `drain`);
- `handshake.py`, `health.py`: the HTTP side (routes, token, limits) and /health;
- `config.py`: `ServerConfig` and the bind policy; `background.py`: a server on its own thread;
- `cli.py`: the `npc-voice serve` command.
"""

from .app import NPCVoiceServer
from .background import BackgroundServer
from .config import DEFAULT_PORT, TOKEN_ENV, ServerConfig, check_bind, is_loopback
from .manager import SessionManager, character_error, resolve_character

__all__ = [
    "DEFAULT_PORT", "TOKEN_ENV", "BackgroundServer", "NPCVoiceServer", "ServerConfig", "SessionManager",
    "character_error", "check_bind", "is_loopback", "resolve_character",
]
