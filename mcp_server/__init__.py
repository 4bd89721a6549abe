"""npc-voice's MCP server: AI assistants create characters and run NPC conversations (docs/mcp.md)."""

from .app import build_server
from .backend import Backend, Settings

__all__ = ["Backend", "Settings", "build_server"]
